"""Which structured-output backend did the server resolve for this request? (runs inside vLLM)

vLLM exposes no per-request backend signal, so this ASGI middleware, loaded into the server with
`--middleware guided_ab.in_server.attribution.BackendAttributionMiddleware`, repeats vLLM's own backend
resolution for each chat/completions request (SamplingParams' structured-output validation,
with the engine's model config, structured-outputs config and tokenizer) and answers with the
result in the `x-guided-ab-backend` response header. Running inside the serving process keeps
it faithful to the exact vLLM version under test; nothing here re-implements the selection.
Every answer to those requests also names the container that served it (`x-guided-ab-served-by`:
Modal's MODAL_TASK_ID, else hostname:pid), so an arm served by several replicas can be compared
container by container.

Imports only the standard library and vllm: the server's virtualenv has neither Prefect nor
the rest of guided_ab's dependencies.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import socket
from typing import Any

HEADER = b"x-guided-ab-backend"  # keep in sync with guided_ab.arms.vllm_args.ATTRIBUTION_HEADER
# Which container (which server process) answered: with Modal replicas an arm is several
# containers, and a slow one must be seen in the records. Keep in sync with
# guided_ab.arms.vllm_args.SERVED_BY_HEADER.
SERVED_BY_HEADER = b"x-guided-ab-served-by"

# Refusals that are the workload's, not a grammar's (guided_ab.load.classify reads the same
# patterns): vLLM 0.32 says "This model's maximum context length is 4096 tokens. However, your
# prompt contains at least 4097 input tokens ..." (renderers/params.py) before any grammar is
# compiled; other servers "context length" / "prompt is too long".
CONTEXT_OVERFLOW = re.compile(r"maximum context length|context length|context window|prompt is too long|"
                              r"prompt contains .* input tokens", re.IGNORECASE | re.DOTALL)
# the server was not started for this kind of request ('tool_choice="required" requires --tool-call-parser')
SERVER_SETUP = re.compile(r"requires --[a-z]", re.IGNORECASE)
# a refusal that names anything of structured output is the grammar's (or the schema's)
GRAMMAR_REFUSAL = re.compile(r"grammar|schema|xgrammar|guidance|outlines|structur|json_object|regex|pattern|lark|"
                             r"ebnf|response_format|guided|tool|unimplemented|unsupported", re.IGNORECASE)
PARAMETER_STATUSES = (400, 422)  # a parameter refusal; other 4xx (401, 404, 429) are not sorted


def workload_refusal(status: int, message: str) -> str | None:
    """"context_overflow" or "invalid_request" when a refusal is the workload's, else None."""
    if CONTEXT_OVERFLOW.search(message):
        return "context_overflow"
    if status in PARAMETER_STATUSES and (SERVER_SETUP.search(message) or (message and not GRAMMAR_REFUSAL.search(message))):
        return "invalid_request"
    return None
PATHS = ("/v1/chat/completions", "/v1/completions")
log = logging.getLogger("guided_ab.in_server.attribution")


def _tools_schema(body: dict[str, Any]) -> dict | None:
    """The schema vLLM constrains a tool call with: a named function's parameters, or for
    `tool_choice: "required"` an array of calls to any offered function (vLLM's own
    get_json_schema_from_tools, where it can be imported)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for t in tools:
            fn = (t.get("function") or {}) if isinstance(t, dict) else {}
            if fn.get("name") == name:
                return fn.get("parameters") or {"type": "object", "properties": {}}
        return None
    if choice != "required":
        return None
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        schema = get_json_schema_from_tools("required", [ChatCompletionToolsParam.model_validate(t) for t in tools])
        return schema if isinstance(schema, dict) else None
    except Exception:  # another vLLM layout: the same shape, written out
        return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                            "parameters": t["function"].get("parameters") or {"type": "object", "properties": {}}},
             "required": ["name", "parameters"]} for t in tools]}}


def requested_schema(body: dict[str, Any]) -> dict | str | None:
    """The JSON schema a request constrains its output with, or None for unconstrained requests."""
    if body.get("tools"):
        return _tools_schema(body)
    rf = body.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            return js.get("schema", js.get("json_schema"))
        if rf.get("type") == "json_object":
            return {"type": "object"}
    so = body.get("structured_outputs")
    if isinstance(so, dict) and so.get("json") is not None:
        return so["json"]
    return None


def served_by(environ: Any = None) -> str:
    """The container serving this process: Modal's MODAL_TASK_ID (the container's id, set by
    Modal in every container and inherited by the vLLM server process), else hostname:pid (a
    local or self-hosted server; vLLM's API server processes differ by pid)."""
    env = os.environ if environ is None else environ
    task = env.get("MODAL_TASK_ID")
    if task:
        return str(task)
    return f"{socket.gethostname()}:{os.getpid()}"


def _engine(app: Any) -> Any:
    state = getattr(app, "state", None)
    return getattr(state, "engine_client", None)


def resolve_backend(engine: Any, schema: dict | str) -> str:
    """vLLM's own resolution of the backend for a JSON-schema request on this engine."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    proc: Any = getattr(engine, "input_processor", None) or getattr(engine, "processor", None)
    so_config = getattr(proc, "structured_outputs_config", None)
    configured = getattr(so_config, "backend", None) or os.environ.get("GUIDED_AB_BACKEND", "unknown")
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=copy.deepcopy(schema)))
    try:
        if hasattr(params, "_validate_structured_outputs"):  # vLLM 0.30+
            params._validate_structured_outputs(proc.model_config, so_config, proc.tokenizer)
        else:  # earlier v1 engines validate in the processor
            proc._validate_structured_output(params)
        return params.structured_outputs._backend or configured
    except Exception:  # the server will reject this request too; say which backend refused it
        if configured != "auto":
            return configured
        try:  # auto tries xgrammar first and falls back when xgrammar refuses
            from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

            validate_xgrammar_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=copy.deepcopy(schema))))
            return "xgrammar"
        except Exception:
            return _auto_fallback(schema)


def _auto_fallback(schema: dict | str) -> str:
    """Where `auto` goes once xgrammar refused: guidance, or (vLLM 0.26 and other versions that
    have the check) outlines for schemas guidance cannot take (e.g. patternProperties)."""
    try:
        from vllm.v1.structured_output.backend_guidance import has_guidance_unsupported_json_features
    except ImportError:  # versions without the check fall back to guidance only
        return "guidance"
    try:
        obj = json.loads(schema) if isinstance(schema, str) else schema
        return "outlines" if has_guidance_unsupported_json_features(obj) else "guidance"
    except Exception:
        return "guidance"


class BackendAttributionMiddleware:
    def __init__(self, app: Any):
        self.app = app
        # once per server process (the middleware is built in the process that serves)
        self.served_by = served_by().encode("utf-8", "replace")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away before sending its body
                await self.app(scope, receive, send)
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        backend = None
        try:
            data = json.loads(body)
            schema = requested_schema(data) if isinstance(data, dict) else None
            engine = _engine(scope.get("app"))
            if schema is not None and engine is not None:
                backend = await asyncio.to_thread(resolve_backend, engine, schema)
        except Exception as err:  # never break serving because attribution failed
            log.warning("backend attribution failed: %s", err)

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        held: dict | None = None  # a refusal's start, until its body says whose refusal it is

        def with_header(msg: dict) -> dict:
            return {**msg, "headers": [*msg.get("headers", []), (HEADER, str(backend).encode())]}

        def with_served_by(msg: dict) -> dict:
            return {**msg, "headers": [*msg.get("headers", []), (SERVED_BY_HEADER, self.served_by)]}

        async def send_with_header(msg: dict) -> None:
            nonlocal held
            if msg["type"] == "http.response.start":
                msg = with_served_by(msg)  # on every answer, refusals and errors included
            if backend and msg["type"] == "http.response.start":
                if int(msg.get("status", 200)) in PARAMETER_STATUSES:
                    held = msg  # sent with the first body chunk
                    return
                msg = with_header(msg)
            elif held is not None and msg["type"] == "http.response.body":
                start, held = held, None
                try:  # a refusal before any grammar was compiled (context length, parameters): no backend to name
                    text = msg.get("body", b"").decode("utf-8", "replace")
                    ours = workload_refusal(int(start.get("status", 400)), text) is None
                except Exception:
                    ours = True
                await send(with_header(start) if ours else start)
            await send(msg)

        await self.app(scope, replay, send_with_header)
