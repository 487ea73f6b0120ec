"""Validate an answer against its schema and put the request in exactly one failure class."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from guided_ab.load.client import RawResponse
from guided_ab.records import Outcome

_FORMATS = Draft202012Validator.FORMAT_CHECKER


@lru_cache(maxsize=4096)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), format_checker=_FORMATS)


def schema_errors(instance: Any, schema: dict) -> str | None:
    """None if `instance` validates (Draft 2020-12, with format checks), else the best error message."""
    v = _validator(json.dumps(schema, sort_keys=True))
    try:
        err = best_match(v.iter_errors(instance))
    except RecursionError:
        return "schema too deeply nested to validate"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"at {where}: {err.message[:300]}"


def classify(raw: RawResponse, schema: dict) -> tuple[Outcome, str | None]:
    """The outcome class of one request, and an error text (None for success).

    Order matters: transport failures first, then HTTP status, then the answer itself.
    A stream cut before its end is a connection_error; garbage from the server (malformed
    stream events, an HTTP 200 body that is not a completion) is invalid_json.
    """
    if raw.failure == "timeout":
        return "timeout", raw.error or "timed out"
    if raw.failure == "connection_error":
        return "connection_error", raw.error or "connection failed"
    if raw.failure == "rejected":  # refused inside an HTTP 200 stream (see client.stream_error)
        return "rejected", raw.error or "rejected"
    if raw.failure == "server_error":
        return "server_error", raw.error or "server error"
    status = raw.http_status or 0
    if 400 <= status < 500:
        return "rejected", raw.error or f"HTTP {status}"
    if status >= 500:
        return "server_error", raw.error or f"HTTP {status}"
    if status != 200:
        return "server_error", raw.error or f"unexpected HTTP status {status}"
    if raw.failure == "protocol":
        return "invalid_json", raw.error or "malformed response"
    if raw.finish_reason == "length":
        return "truncated", f"answer hit max_tokens ({raw.completion_tokens} tokens)"
    try:
        instance = json.loads(raw.text or "")
    except ValueError as err:
        return "invalid_json", f"not JSON: {err}"
    except RecursionError:  # e.g. "[[[[..." thousands deep: json gives up, the request must not
        return "invalid_json", "not JSON this parser can read: nested too deeply"
    problem = schema_errors(instance, schema)
    if problem:
        return "schema_violation", problem
    return "success", None
