"""Send one structured chat completion to an OpenAI-compatible endpoint and time it.

Streaming requests give time to first token (TTFT); every request gets an end-to-end latency,
token counts, finish_reason and the backend the server resolved (response header set by
guided_ab.in_server.attribution inside the vLLM process). Nothing here raises for a bad answer: every
outcome comes back as a RawResponse, to be classified by guided_ab.load.classify.

The clock: both times start when the request goes out (an aiohttp trace hook right before the
body, with the headers buffered with it, is written to the connection; like guidellm, so waiting
for a pooled connection, connecting and building the request are not the server's time), TTFT
stops when the network chunk holding the first content event reaches this process (before that
event is parsed), latency when the response has ended; `sent_at` is the wall clock at that
start. The HTTP client is an aiohttp session from `new_session` (pooled keep-alive connections,
a C HTTP parser, raw SSE chunks split here and parsed with orjson: ~7x less CPU per streamed
request than httpx here).
bench/loadgen_vs_guidellm.py measures the load path against a server's own timings.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from guided_ab.arms.vllm_args import ATTRIBUTION_HEADER, SERVED_BY_HEADER
from guided_ab.load.send_clock import SendClock, arm
from guided_ab.redact import redact, redact_bytes

_loads = orjson.loads  # ~5x faster than json for the many small SSE events of a stream


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. integers beyond 64 bits in a schema: json handles them
        return json.dumps(obj).encode()


@dataclass
class RawResponse:
    sent_at: float
    http_status: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    backend: str | None = None
    served_by: str | None = None  # the container that answered (SERVED_BY_HEADER; None without an answer)
    # transport-level failure: "timeout" | "connection_error" | "protocol" (garbage from the server)
    failure: str | None = None
    error: str | None = None
    # the answer's tool calls, [{"name", "arguments"}] (arguments as the text the server sent;
    # streamed deltas joined per call index); None when the answer carried none
    tool_calls: list[dict[str, Any]] | None = None


def chat_body(model: str, prompt: str, schema: dict, *, name: str, temperature: float, max_tokens: int, stream: bool) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": temperature,
        "max_tokens": max_tokens,
        # response_format json_schema is the OpenAI-standard way; never the old `guided_json`,
        # which new vLLM servers silently ignore (unconstrained output, HTTP 200).
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64], "schema": schema},
        },
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def request_body(model: str, stream: bool, body: dict) -> dict:
    """A replayed (or tool-mode) request as it is sent to one arm: its own body, with the arm's
    model and the plan's stream flag; nothing else changes."""
    out = {**body, "model": model, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def _count(value: Any) -> int | None:
    """A token count from the server: an int or None; anything else is garbage (TypeError)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"token count {value!r} is not an integer")


def _str(value: Any) -> str | None:
    """A text field from the server: a str or None; anything else is garbage (TypeError)."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{value!r} is not a string")


def _header(value: str | None) -> str | None:
    """A header value as plain text: aiohttp keeps non-UTF-8 bytes as lone surrogates, which no
    record can be written with (JSON needs valid UTF-8)."""
    return None if value is None else value.encode("utf-8", "replace").decode("utf-8")


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def stream_error(err: object) -> tuple[str, str]:
    """(failure, message) for an error event inside an HTTP 200 stream.

    vLLM starts streaming before it validates the grammar, so a request it refuses (e.g.
    `Grammar error: Unimplemented keys: ["uniqueItems"]`) arrives as HTTP 200 plus an error
    event carrying the real status code: classify by that code, as for a non-streamed answer.
    """
    code = err.get("code") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    text = _short(str(message or err))
    if isinstance(code, int) and 400 <= code < 500:
        return "rejected", f"HTTP {code} (in stream): {text}"
    if isinstance(code, int) and code >= 500:
        return "server_error", f"HTTP {code} (in stream): {text}"
    return "protocol", f"error event in stream: {text}"


def _error_message(raw: bytes) -> str:
    try:
        data = _loads(raw)
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                return _short(str(err.get("message") or err))
            return _short(str(err))
    except ValueError:
        pass
    return _short(raw.decode("utf-8", "replace"))


def new_session(concurrency: int, *, connect_timeout_s: float = 10.0, clock: SendClock | None = None) -> aiohttp.ClientSession:
    """A pooled HTTP client for send_chat: up to `concurrency` keep-alive connections.

    Create it inside the event loop that uses it and close it there (`async with`). Per-request
    deadlines come from send_chat's timeout_s, not from the session. With a `clock` (an open
    loop on asyncio's own loop, guided_ab.load.send_clock) a request given `not_before` is
    written at once but for its last byte, which the clock writes at that instant.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300,
                                     socket_factory=clock.socket_factory if clock is not None else None)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        trace_configs=[_held_trace(clock) if clock is not None else _SENT_TRACE],
    )


class _Sent:
    """When the request went out: set by a trace hook right before the body (and the headers
    buffered with it) is written to the connection, or, for a request held for the send clock,
    by the clock when it wrote the last byte (`released` is done then)."""

    __slots__ = ("perf", "wall", "not_before", "held", "released")

    def __init__(self, not_before: float | None = None) -> None:
        self.perf: float | None = None
        self.wall: float | None = None
        self.not_before = not_before  # time.perf_counter() instant the body may go out (send_chat's)
        self.held = False  # its last byte is with the send clock
        self.released: asyncio.Future[None] | None = None


async def _on_chunk_sent(session: Any, ctx: Any, params: Any) -> None:
    sent = ctx.trace_request_ctx
    if isinstance(sent, _Sent) and sent.perf is None:
        # an open loop's arrival, prepared ahead (request built, connection taken): it waits
        # here, right before the write, for its scheduled instant. The loop's timers fire on
        # millisecond ticks (uvloop), which would send the arrivals of one millisecond together:
        # the timer wakes it about a millisecond early, and it yields to the loop until the instant.
        # (With a send clock, _held_trace's hook instead: this loop's lateness skews short gaps.)
        while sent.not_before is not None and (wait := sent.not_before - time.perf_counter()) > 0:
            await asyncio.sleep(wait - 0.001 if wait > 0.0015 else 0)
        sent.perf, sent.wall = time.perf_counter(), time.time()


def _held_trace(clock: SendClock) -> aiohttp.TraceConfig:
    """The trace hook of a session with a send clock: a scheduled request is armed, so that the
    write that follows keeps its last byte for the clock (send_clock.HeldSocket)."""

    async def on_chunk_sent(session: Any, ctx: Any, params: Any) -> None:
        sent = ctx.trace_request_ctx
        if isinstance(sent, _Sent) and sent.perf is None and not sent.held:
            if sent.not_before is None:  # not scheduled: it goes now
                sent.perf, sent.wall = time.perf_counter(), time.time()
            else:
                arm(clock, sent)

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    trace.freeze()
    return trace


_SENT_TRACE = aiohttp.TraceConfig()
_SENT_TRACE.on_request_chunk_sent.append(_on_chunk_sent)
_SENT_TRACE.freeze()


class _StreamState:
    """Parses SSE lines into a RawResponse; `feed` returns False once the stream must stop."""

    __slots__ = ("out", "parts", "done", "calls")

    def __init__(self, out: RawResponse):
        self.out = out
        self.parts: list[str] = []
        self.done = False
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> {"name", "arguments" parts}

    def _tool_deltas(self, deltas: Any, now: float, t0: float) -> None:
        """Accumulate streamed tool-call deltas: the name comes once, the arguments in pieces."""
        for d in deltas:
            idx = d.get("index", len(self.calls))
            if not isinstance(idx, int):
                raise TypeError(f"tool call index {idx!r} is not an integer")
            call = self.calls.setdefault(idx, {"name": None, "arguments": []})
            fn = d.get("function") or {}
            if fn.get("name"):
                call["name"] = _str(fn["name"])
            args = _str(fn.get("arguments"))
            if args:
                if self.out.ttft_s is None:
                    self.out.ttft_s = now - t0
                call["arguments"].append(args)

    def feed(self, line: bytes, now: float, t0: float) -> bool:
        if not line.startswith(b"data:"):
            return True  # comments, "event:" and blank lines
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return False
        out = self.out
        try:
            chunk = _loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            out.failure, out.error = "protocol", f"malformed stream event: {_short(data.decode('utf-8', 'replace'), 200)}"
            return False
        if chunk.get("error"):
            out.failure, out.error = stream_error(chunk["error"])
            return False
        try:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta")
                content = _str(delta.get("content")) if delta else None
                if content:
                    if out.ttft_s is None:
                        out.ttft_s = now - t0
                    self.parts.append(content)
                if delta and delta.get("tool_calls"):
                    self._tool_deltas(delta["tool_calls"], now, t0)
                if choice.get("finish_reason"):
                    out.finish_reason = _str(choice["finish_reason"])
            usage = chunk.get("usage")
            if usage:
                out.prompt_tokens = _count(usage.get("prompt_tokens"))
                out.completion_tokens = _count(usage.get("completion_tokens"))
        except (AttributeError, TypeError):
            out.failure, out.error = "protocol", f"malformed stream event: {_short(str(chunk), 200)}"
            return False
        return True

    def finish(self) -> None:
        out = self.out
        if out.failure is not None:
            return  # garbage from the server: no answer text
        out.text = "".join(self.parts)
        if self.calls:
            out.tool_calls = [{"name": c["name"], "arguments": "".join(c["arguments"])} for _, c in sorted(self.calls.items())]
        if not self.done and out.finish_reason is None:
            out.failure, out.error = "connection_error", "stream ended before the answer was complete"


async def _read_sse(content: aiohttp.StreamReader, out: RawResponse, t0: float) -> None:
    """Read SSE from raw network chunks: one timestamp per chunk, taken before it is parsed.

    After [DONE] the rest of the response is drained (not parsed), so the connection goes back
    to the pool instead of being closed.
    """
    state = _StreamState(out)
    perf = time.perf_counter
    pending = b""
    parsing = True
    async for chunk in content.iter_any():
        if not parsing:
            continue
        now = perf()
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if not state.feed(line, now, t0):
                parsing = False
                break
    if parsing and pending:
        state.feed(pending, perf(), t0)
    state.finish()


def _read_body(raw: bytes, out: RawResponse) -> None:
    try:
        data = _loads(raw)  # strict (orjson): a lone surrogate is garbage, not text no record could hold
        choice = data["choices"][0]
        out.text = _str(choice["message"]["content"]) or ""
        calls = choice["message"].get("tool_calls")
        if calls:
            out.tool_calls = [{"name": _str(c["function"]["name"]), "arguments": _str(c["function"].get("arguments")) or ""}
                              for c in calls]
        out.finish_reason = _str(choice.get("finish_reason"))
        usage = data.get("usage") or {}
        out.prompt_tokens = _count(usage.get("prompt_tokens"))
        out.completion_tokens = _count(usage.get("completion_tokens"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        out.text = out.finish_reason = out.prompt_tokens = out.completion_tokens = out.tool_calls = None
        out.failure, out.error = "protocol", f"HTTP 200 body is not a chat completion: {_short(raw.decode('utf-8', 'replace'), 200)}"


async def send_chat(
    http: aiohttp.ClientSession,
    base_url: str,
    body: dict,
    *,
    api_key: str | None,
    timeout_s: float,
    not_before: float | None = None,
) -> RawResponse:
    """POST one chat completion; the whole exchange (headers and body) must end within timeout_s.

    `http` is a session from new_session. Redirects are not followed: an arm's URL names the
    server that answers, and a 3xx (to another port, say) is recorded as it came (server_error
    with its Location), never counted as that arm's answer. Whatever the server sent back is
    kept with the key redacted (guided_ab.redact: a server may echo the Authorization header).
    `not_before` (a time.perf_counter() value: an open loop's scheduled instant): the request is
    prepared at once and its bytes held until then, so the work before the write is not its lag.
    """
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = _dumps(body)
    out = RawResponse(sent_at=time.time())
    t0 = time.perf_counter()
    sent = _Sent(not_before)
    try:
        async with asyncio.timeout(timeout_s):
            async with http.post(url, data=payload, headers=headers, trace_request_ctx=sent, allow_redirects=False) as resp:
                if sent.released is not None:  # a held request: the answer may come before the clock's word
                    await sent.released
                if sent.perf is not None and sent.wall is not None:  # the clocks start when the request went out
                    t0, out.sent_at = sent.perf, sent.wall
                out.http_status = resp.status
                out.backend = _header(resp.headers.get(ATTRIBUTION_HEADER))
                out.served_by = _header(resp.headers.get(SERVED_BY_HEADER))
                if 300 <= resp.status < 400:
                    where = _header(resp.headers.get("Location")) or "nowhere"
                    out.error = _short(f"HTTP {resp.status} redirect to {where}, not followed: point the arm's url at the server that answers", 300)
                elif resp.status != 200:
                    out.error = _error_message(redact_bytes(await resp.read(), [api_key]))
                elif body.get("stream") and resp.content_type == "text/event-stream":
                    await _read_sse(resp.content, out, t0)
                else:
                    _read_body(redact_bytes(await resp.read(), [api_key]), out)
    except TimeoutError:
        out.failure, out.error = "timeout", f"no complete answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as err:
        out.failure, out.error = "connection_error", f"{type(err).__name__}: {err}"
    out.latency_s = time.perf_counter() - t0
    out.text, out.error, out.backend, out.served_by = (
        redact(x, [api_key]) for x in (out.text, out.error, out.backend, out.served_by))
    return out
