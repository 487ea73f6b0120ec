"""Validate an answer against its schema and put the request in exactly one failure class."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from guided_ab.load.client import RawResponse
from guided_ab.load.validate import schema_key, validate
from guided_ab.records import Outcome

DEFAULT_VALIDATION_TIMEOUT_S = 2.0  # workload.validation_timeout_s's default
_executor: ThreadPoolExecutor | None = None


def _forget_executor() -> None:
    """In a forked child: the parent's worker threads did not come along; a pool that believes
    it has them would never run a validation (every answer a validation_timeout)."""
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_executor)


def schema_errors(instance: Any, schema: dict, timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S) -> str | None:
    """None if `instance` validates (Draft 2020-12, with format checks), else what is wrong."""
    outcome, error = validate(instance, schema, timeout_s)
    return None if outcome == "success" else error


def _answer(raw: RawResponse) -> tuple[Outcome | None, str | None, Any]:
    """Everything but the schema: (outcome, error, None) when the request's class is settled
    without validation, else (None, None, the parsed answer).

    Order matters: transport failures first, then HTTP status, then the answer itself.
    A stream cut before its end is a connection_error; garbage from the server (malformed
    stream events, an HTTP 200 body that is not a completion) is invalid_json.
    """
    if raw.failure == "timeout":
        return "timeout", raw.error or "timed out", None
    if raw.failure == "connection_error":
        return "connection_error", raw.error or "connection failed", None
    if raw.failure == "rejected":  # refused inside an HTTP 200 stream (see client.stream_error)
        return "rejected", raw.error or "rejected", None
    if raw.failure == "server_error":
        return "server_error", raw.error or "server error", None
    status = raw.http_status or 0
    if 400 <= status < 500:
        return "rejected", raw.error or f"HTTP {status}", None
    if status >= 500:
        return "server_error", raw.error or f"HTTP {status}", None
    if status != 200:
        return "server_error", raw.error or f"unexpected HTTP status {status}", None
    if raw.failure == "protocol":
        return "invalid_json", raw.error or "malformed response", None
    if raw.finish_reason == "length":
        return "truncated", f"answer hit max_tokens ({raw.completion_tokens} tokens)", None
    try:
        return None, None, json.loads(raw.text or "")
    except ValueError as err:
        return "invalid_json", f"not JSON: {err}", None
    except RecursionError:  # e.g. "[[[[..." thousands deep: json gives up, the request must not
        return "invalid_json", "not JSON this parser can read: nested too deeply", None


def classify(raw: RawResponse, schema: dict, timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S) -> tuple[Outcome, str | None]:
    """The outcome class of one request, and an error text (None for success), in this thread."""
    outcome, error, instance = _answer(raw)
    if outcome is not None:
        return outcome, error
    return validate(instance, schema, timeout_s)


async def classify_async(raw: RawResponse, schema: dict, *, timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S,
                         key: str | None = None) -> tuple[Outcome, str | None]:
    """classify, with the validation in a worker thread bounded by `timeout_s`: the event loop
    (every other request's clock) never waits for a slow validation. `key`: the schema's
    load.validate.schema_key, when the caller has it."""
    outcome, error, instance = _answer(raw)
    if outcome is not None:
        return outcome, error
    global _executor
    if _executor is None:  # a few threads: a stuck one (bounded anyway) never blocks the rest
        _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="guided-ab-validate")
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_executor, validate, instance, key or schema_key(schema), timeout_s)
    try:  # the regexes stop at the deadline themselves; this bounds everything else
        return await asyncio.wait_for(fut, timeout_s + 0.5)
    except TimeoutError:
        return "validation_timeout", f"validation took longer than {timeout_s:g} s"
