"""Requests to replay: a team's own traffic, read from an OpenAI Batch API input file (.jsonl).

One line per request, the format `vllm run-batch` and OpenAI's Batch API read:
`{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`. The body
carries its own `messages`, `max_tokens`, `temperature`, and either
`response_format: {"type": "json_schema", ...}` (a JSON answer) or `tools` + `tool_choice`
(`"required"` or a named function: a tool call). Every arm is sent the same body; only `model`
(the arm's) and `stream` (the plan's) are set per request.

Everything is checked before anything starts: a line that is not JSON, an unknown `url`, a body
without a schema or tools, a tool whose `parameters` is not a valid schema is a ConfigError naming
the file and line (exit 2). `tool_spec` is what the classification reads: the functions a request
offers (name -> parameters) and whether it must call one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from guided_ab.config import ConfigError, Workload

CHAT_URL = "/v1/chat/completions"
# set per request by the runner (the arm's model, the plan's stream flag), never taken from the file
PER_REQUEST_FIELDS = ("model", "stream", "stream_options")
MAX_LINE_BYTES = 4 * 1024 * 1024  # one request; a larger line is refused, never parsed
MAX_FILE_BYTES = 512 * 1024 * 1024


def is_replay_suite(suite: str) -> bool:
    return suite.endswith(".jsonl")


def tool_spec(body: dict[str, Any] | None) -> tuple[dict[str, dict], bool] | None:
    """({function name: parameters schema}, a call is required) of a body with tools, else None.

    A named `tool_choice` offers that function only (a call to any other is a call to an unknown
    function); `"required"` offers every tool of the request.
    """
    if not body or not body.get("tools"):
        return None
    tools = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in body["tools"]}
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return {name: tools[name]}, True
    return tools, choice == "required"


def answer_schema(body: dict[str, Any]) -> dict:
    """The schema a request's answer is held to: its response_format schema, or its functions'
    parameters (one function: that schema; several: any of them)."""
    spec = tool_spec(body)
    if spec is None:
        return body["response_format"]["json_schema"]["schema"]
    params = list(spec[0].values())
    return params[0] if len(params) == 1 else {"anyOf": params}


def _fail(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}")


def _check_body(body: Any, where: str, wl: Workload, check_schema: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _fail(where, "`body` must be a JSON object (the chat completion request)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _fail(where, "body.messages must be a non-empty list of message objects")
    out = {k: copy.deepcopy(v) for k, v in body.items() if k not in PER_REQUEST_FIELDS}
    if "max_tokens" not in out and "max_completion_tokens" not in out:
        out["max_tokens"] = wl.max_tokens  # the line's own budget, else the workload's
    if "temperature" not in out:
        out["temperature"] = wl.temperature
    rf, tools = out.get("response_format"), out.get("tools")
    if tools is not None:
        if rf is not None:
            raise _fail(where, "a body has either response_format or tools, not both")
        if not isinstance(tools, list) or not tools:
            raise _fail(where, "body.tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
        names = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise _fail(where, f"body.tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}")
            if fn["name"] in names:
                raise _fail(where, f"body.tools[{i}]: function {fn['name']!r} is defined twice")
            names.append(fn["name"])
            check_schema(fn.get("parameters", {"type": "object"}), f"{where}: tool {fn['name']!r} parameters",
                         wl.max_schema_bytes)
        choice = out.get("tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise _fail(where, f"body.tool_choice names function {name!r}, which is not in body.tools {names}")
        elif choice != "required":
            raise _fail(where, "body.tool_choice must be \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}} "
                        f"(got {choice!r}): a replayed tool request must ask for a call, so that it can be judged")
    elif isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise _fail(where, "body.response_format.json_schema must hold a \"schema\"")
        js["schema"] = check_schema(js["schema"], f"{where}: response_format schema", wl.max_schema_bytes)
        js.setdefault("name", "answer")
    else:
        raise _fail(where, "the body has no schema: give response_format {\"type\": \"json_schema\", \"json_schema\": "
                    "{\"name\": ..., \"schema\": ...}} or tools + tool_choice")
    return out


def read_requests(path: Path, wl: Workload) -> list[dict[str, Any]]:
    """Every request of a Batch API input file, checked: [{"custom_id", "line", "body"}] in file order."""
    from guided_ab.workload import check_schema  # the same schema checks as every other suite

    if not path.is_file():
        raise ConfigError(f"workload.suite: {path} does not exist or is not a file (a .jsonl of requests to replay)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: over {MAX_FILE_BYTES} bytes: split the file or sample it before replaying")
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                raise _fail(where, f"line over {MAX_LINE_BYTES} bytes; shorten this request or drop it")
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError) as err:
                raise _fail(where, f"not a JSON object ({str(err)[:200]}); each line must be one request "
                            '{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}') from None
            if not isinstance(line, dict):
                raise _fail(where, f"a line must be a JSON object, got {type(line).__name__}")
            cid = line.get("custom_id")
            if not isinstance(cid, str) or not cid.strip():
                raise _fail(where, "`custom_id` must be a non-empty string (it keys the request's records)")
            if cid in seen:
                raise _fail(where, f"custom_id {cid!r} already used on line {seen[cid]}; custom_ids must be unique")
            seen[cid] = n
            if line.get("method", "POST") != "POST":
                raise _fail(where, f"method {line.get('method')!r}: only POST requests can be replayed")
            if line.get("url") != CHAT_URL:
                raise _fail(where, f"url {line.get('url')!r} is not replayed; only {CHAT_URL!r} requests are")
            out.append({"custom_id": cid, "line": n, "body": _check_body(line.get("body"), where, wl, check_schema)})
    if not out:
        raise ConfigError(f"{path}: no request lines; a replay file holds one JSON request per line")
    return out
