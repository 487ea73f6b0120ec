"""Validate an answer against its schema and put the request in exactly one failure class.

A request with tools is judged on its tool calls: each call's arguments are parsed and validated
against that function's `parameters` (no call when one was required: `no_tool_call`; a call to a
function the request did not offer: `unknown_tool`). A refusal (HTTP 4xx) is the grammar's
(`rejected`) unless the server's message says the workload itself was at fault: the prompt plus
`max_tokens` over the context (`context_overflow`; also an answer the server ended at the
context's end, short of its `max_tokens`), or another parameter refusal with nothing
about grammars or schemas in it (`invalid_request`); those are workload problems
(records.WORKLOAD_OUTCOMES), never counted against a backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from guided_ab.in_server.attribution import workload_refusal
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


def refusal_class(status: int, message: str | None) -> Outcome:
    """The class of a 4xx refusal from its status and the server's message (see the module doc;
    the patterns are in_server.attribution's, so the server's header and the record agree)."""
    found = workload_refusal(status, message or "")
    return found if found is not None else "rejected"  # type: ignore[return-value]


def _answer(raw: RawResponse, tools: bool = False, max_tokens: int | None = None) -> tuple[Outcome | None, str | None, Any]:
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
    if raw.failure == "rejected":  # refused inside an HTTP 200 stream (see client.stream_error: "HTTP <code> (in stream)")
        code = re.match(r"HTTP (\d{3})", raw.error or "")
        return refusal_class(int(code.group(1)) if code else 400, raw.error), raw.error or "rejected", None
    if raw.failure == "server_error":
        return "server_error", raw.error or "server error", None
    status = raw.http_status or 0
    if 400 <= status < 500:
        return refusal_class(status, raw.error), raw.error or f"HTTP {status}", None
    if status >= 500:
        return "server_error", raw.error or f"HTTP {status}", None
    if status != 200:
        return "server_error", raw.error or f"unexpected HTTP status {status}", None
    if raw.failure == "protocol":
        return "invalid_json", raw.error or "malformed response", None
    if raw.finish_reason == "length":
        if max_tokens is not None and raw.completion_tokens is not None and raw.completion_tokens < max_tokens:
            # stopped before its max_tokens: the context ran out (vLLM 0.32 runs a prompt that fits
            # alone and ends it at max_model_len): the workload's problem, not the backend's
            return "context_overflow", (f"answer stopped at the context's end after {raw.completion_tokens} of "
                                        f"max_tokens {max_tokens} (prompt {raw.prompt_tokens} tokens): prompt + max_tokens "
                                        "does not fit the model's maximum context length"), None
        return "truncated", f"answer hit max_tokens ({raw.completion_tokens} tokens)", None
    if tools or raw.tool_calls is not None:  # judged on the tool calls (_tool_checks), not the text
        return None, None, _TOOL_CALLS
    try:
        return None, None, json.loads(raw.text or "")
    except ValueError as err:
        return "invalid_json", f"not JSON: {err}", None
    except RecursionError:  # e.g. "[[[[..." thousands deep: json gives up, the request must not
        return "invalid_json", "not JSON this parser can read: nested too deeply", None


_TOOL_CALLS = object()  # _answer's "the answer is its tool calls" marker
Tools = tuple[dict[str, dict], bool]  # replay.tool_spec: ({function: parameters}, a call is required)
Checks = list[tuple[str, Any, dict | str]]  # (function name, parsed arguments, schema or its key)


def _tool_checks(raw: RawResponse, tools: Tools, instance: Any) -> tuple[Outcome | None, str | None, Checks]:
    """(outcome, error, []) when the tool calls settle the class without validation, else
    (None, None, [(function, arguments, schema)]) for every call to validate."""
    functions, required = tools
    calls = raw.tool_calls or []
    if not calls:
        if required:
            return "no_tool_call", "no tool call in the answer, and the request required one", []
        return None, None, []
    checks: Checks = []
    for c in calls:
        name = c.get("name")
        if name not in functions:
            return "unknown_tool", f"called function {name!r}, which the request did not offer ({sorted(functions)})", []
        try:
            args = json.loads(c.get("arguments") or "")
        except ValueError as err:
            return "invalid_json", f"tool call {name!r}: arguments are not JSON: {err}", []
        except RecursionError:
            return "invalid_json", f"tool call {name!r}: arguments nested too deeply to parse", []
        checks.append((name, args, functions[name]))
    return None, None, checks


def _validate_calls(checks: Checks, timeout_s: float) -> tuple[Outcome, str | None]:
    for name, args, schema in checks:
        outcome, error = validate(args, schema, timeout_s)
        if outcome != "success":
            return outcome, f"tool call {name!r}: {error}"
    return "success", None


def classify(raw: RawResponse, schema: dict, timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S,
             tools: Tools | None = None, max_tokens: int | None = None) -> tuple[Outcome, str | None]:
    """The outcome class of one request, and an error text (None for success), in this thread.
    `tools`: the request's functions (replay.tool_spec) when it was sent with tools; `max_tokens`:
    what the request asked for (an answer cut short of it ran out of context)."""
    outcome, error, instance = _answer(raw, tools is not None, max_tokens)
    if outcome is not None:
        return outcome, error
    if tools is not None:
        outcome, error, checks = _tool_checks(raw, tools, instance)
        return (outcome, error) if outcome is not None else _validate_calls(checks, timeout_s)
    if instance is _TOOL_CALLS:
        return "invalid_json", "the answer is a tool call, but the request sent no tools"
    return validate(instance, schema, timeout_s)


async def classify_async(raw: RawResponse, schema: dict, *, timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S,
                         key: str | None = None, tools: Tools | None = None,
                         max_tokens: int | None = None) -> tuple[Outcome, str | None]:
    """classify, with the validation in a worker thread bounded by `timeout_s`: the event loop
    (every other request's clock) never waits for a slow validation. `key`: the schema's
    load.validate.schema_key, when the caller has it."""
    outcome, error, instance = _answer(raw, tools is not None, max_tokens)
    if outcome is not None:
        return outcome, error
    checks: Checks = []
    if tools is not None:
        outcome, error, checks = _tool_checks(raw, tools, instance)
        if outcome is not None:
            return outcome, error
        if not checks:
            return "success", None
    elif instance is _TOOL_CALLS:
        return "invalid_json", "the answer is a tool call, but the request sent no tools"
    global _executor
    if _executor is None:  # a few threads: a stuck one (bounded anyway) never blocks the rest
        _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="guided-ab-validate")
    loop = asyncio.get_running_loop()
    if checks:
        keyed: Checks = [(n, a, sch if isinstance(sch, str) else schema_key(sch)) for n, a, sch in checks]
        fut = loop.run_in_executor(_executor, _validate_calls, keyed, timeout_s)
        bound = timeout_s * len(checks)
    else:
        fut = loop.run_in_executor(_executor, validate, instance, key or schema_key(schema), timeout_s)
        bound = timeout_s
    try:  # the regexes stop at the deadline themselves; this bounds everything else
        return await asyncio.wait_for(fut, bound + 0.5)
    except TimeoutError:
        return "validation_timeout", f"validation took longer than {bound:g} s"
