"""More ways a server can misbehave, for the loopback fault server (guided_ab.selfcheck.fault_server):
the hostile afternoon of issue 17 (a server echoing the API key, an answer that makes a regex
backtrack, 429s, odd statuses, redirects to another port, a 200 KB header, a 10 MB answer,
invalid UTF-8, a stream without `[DONE]`, absurd token counts, ...). Kept apart from the server
so that each mode is one small function; stdlib only, like the server (it runs as a subprocess
that must start fast).

Each mode answers one chat request on the raw connection and returns whether the connection may
be kept alive. `srv` is the FaultServer (its backend, model and options); `content` is the
healthy answer (a schema-valid JSON text) the mode may send, bend or wrap.

    echo           the request's Authorization header sent back: in a 400 error message
                   (non-streaming) or inside the answer (streaming)
    evil_regex     a JSON string of `evil_length` "a"s and a "!": `^(a+)+$` backtracks on it
    ratelimit      HTTP 429 with retry-after
    status999      HTTP status 999
    redirect       HTTP 307 to `redirect_to` (another server, e.g. on another port)
    huge_header    a healthy answer with a 200 KB response header
    huge_body      a healthy answer followed by 10 MB of JSON whitespace (body or stream)
    bad_utf8       bytes that are not UTF-8 inside the answer
    no_done        a stream that ends after its finish_reason without `data: [DONE]`
    absurd_tokens  a healthy answer with token counts -7 and 2**62
    empty_body     HTTP 200 with an empty body
    crlf_sse       a stream whose lines end in CRLF
    tiny_chunks    a stream written one byte per TCP write
    slow_headers   the status line and headers trickled a byte every 0.2 s (past any short timeout)
    gzip_garbage   content-encoding gzip on bytes that are not gzip
    null_answer    the answer `null`
    many_events    the answer in 5,000 one-character events
    sse_comments   keep-alive comment lines between the events
    json_for_stream  a stream asked for, a plain JSON completion sent
    html_502       HTTP 502 with an HTML page
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

EXTRA_MODES = (
    "echo", "evil_regex", "ratelimit", "status999", "redirect", "huge_header", "huge_body", "bad_utf8",
    "no_done", "absurd_tokens", "empty_body", "crlf_sse", "tiny_chunks", "slow_headers", "gzip_garbage",
    "null_answer", "many_events", "sse_comments", "json_for_stream", "html_502",
)
HUGE = 10 * 1024 * 1024


def _head(status: int, reason: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _completion(srv: Any, content: str, usage: dict | None = None) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": srv.model, "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


def _events(srv: Any, pieces: list[str], *, done: bool = True, usage: dict | None = None) -> list[bytes]:
    """The SSE lines of a stream answering `pieces` (without framing or line ends)."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": srv.model}

    def ev(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode()

    out = [ev({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    out += [ev({**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces]
    out.append(ev({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out.append(ev({**base, "choices": [], "usage": usage or {"prompt_tokens": 10, "completion_tokens": len(pieces),
                                                              "total_tokens": 10 + len(pieces)}}))
    if done:
        out.append(b"data: [DONE]")
    return out


async def _send_json(srv: Any, writer: Any, status: int, reason: str, payload: bytes, extra: dict | None = None,
                     content_type: str = "application/json") -> bool:
    srv.stats[f"status:{status}"] += 1
    headers = {"content-type": content_type, "content-length": str(len(payload)), **(extra or {})}
    writer.write(_head(status, reason, headers) + payload)
    await writer.drain()
    return True


async def _send_stream(srv: Any, writer: Any, lines: list[bytes], *, sep: bytes = b"\n", extra: dict | None = None,
                       byte_by_byte: bool = False) -> bool:
    """A chunked text/event-stream of `lines`, each ended by `sep` twice (an SSE event)."""
    srv.stats["status:200"] += 1
    head = _head(200, "OK", {"content-type": "text/event-stream; charset=utf-8", "transfer-encoding": "chunked",
                             "x-guided-ab-backend": srv.backend, **(extra or {})})
    body = b"".join(line + sep + sep for line in lines)
    framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if not byte_by_byte:
        writer.write(head + framed)
        await writer.drain()
        return True
    writer.write(head)
    for i in range(len(framed)):
        writer.write(framed[i:i + 1])
        await writer.drain()
    return True


async def respond(srv: Any, mode: str, headers: dict[str, str], req: dict, content: str, reader: Any, writer: Any) -> bool:
    """Answer one chat request in an extra mode; returns whether the connection may be kept."""
    stream = bool(req.get("stream"))
    attribution = {"x-guided-ab-backend": srv.backend}
    if mode == "echo":
        seen = headers.get("authorization", "")
        if not stream:
            msg = json.dumps({"error": {"message": f"bad request; you sent Authorization: {seen}", "code": 400}})
            return await _send_json(srv, writer, 400, "Bad Request", msg.encode())
        return await _send_stream(srv, writer, _events(srv, [json.dumps({"you_sent": seen})]), extra=attribution)
    if mode == "evil_regex":
        text = json.dumps("a" * srv.evil_length + "!")
        if stream:
            return await _send_stream(srv, writer, _events(srv, [text]), extra=attribution)
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, text)).encode(), attribution)
    if mode == "ratelimit":
        limited = json.dumps({"error": {"message": "rate limit exceeded", "code": 429}}).encode()
        return await _send_json(srv, writer, 429, "Too Many Requests", limited, {"retry-after": "1"})
    if mode == "status999":
        return await _send_json(srv, writer, 999, "Whatever", b'{"error": "999"}')
    if mode == "redirect":
        return await _send_json(srv, writer, 307, "Temporary Redirect", b"",
                                {"location": srv.redirect_to.rstrip("/") + "/v1/chat/completions"})
    if mode == "html_502":
        return await _send_json(srv, writer, 502, "Bad Gateway", b"<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
    if mode == "empty_body":
        return await _send_json(srv, writer, 200, "OK", b"", attribution)
    if mode == "gzip_garbage":
        return await _send_json(srv, writer, 200, "OK", b"this is not gzip at all" * 10,
                                {**attribution, "content-encoding": "gzip"})
    if mode == "slow_headers":
        srv.stats["stalled"] += 1
        head = _head(200, "OK", {"content-type": "application/json", "content-length": "2", **attribution})
        for i in range(len(head)):
            if reader.at_eof():  # the client gave up (its timeout): stop trickling
                return False
            writer.write(head[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.write(b"{}")
        await writer.drain()
        return False
    if mode == "huge_header":
        extra = {**attribution, "x-padding": "p" * (200 * 1024)}
        if stream:
            return await _send_stream(srv, writer, _events(srv, [content]), extra=extra)
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, content)).encode(), extra)
    if mode == "huge_body":
        if stream:
            pad = " " * (64 * 1024)
            return await _send_stream(srv, writer, _events(srv, [content] + [pad] * (HUGE // len(pad))), extra=attribution)
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, content + " " * HUGE)).encode(), attribution)
    if mode == "bad_utf8":
        good = json.dumps(_completion(srv, "PLACEHOLDER")).encode()
        payload = good.replace(b"PLACEHOLDER", b"\xff\xfe\xc3(")
        if stream:
            lines = [line.replace(b'"content":"x"', b'"content":"\xff\xfe"') for line in _events(srv, ["x"])]
            return await _send_stream(srv, writer, lines, extra=attribution)
        return await _send_json(srv, writer, 200, "OK", payload, attribution)
    if mode == "absurd_tokens":
        usage = {"prompt_tokens": -7, "completion_tokens": 2**62, "total_tokens": 2**62 - 7}
        if stream:
            return await _send_stream(srv, writer, _events(srv, [content], usage=usage), extra=attribution)
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, content, usage)).encode(), attribution)
    if mode == "null_answer":
        if stream:
            return await _send_stream(srv, writer, _events(srv, ["null"]), extra=attribution)
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, "null")).encode(), attribution)
    if mode == "json_for_stream":
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, content)).encode(), attribution)
    # the stream modes below answer a non-streaming request healthily
    if not stream:
        return await _send_json(srv, writer, 200, "OK", json.dumps(_completion(srv, content)).encode(), attribution)
    if mode == "no_done":
        return await _send_stream(srv, writer, _events(srv, [content], done=False), extra=attribution)
    if mode == "crlf_sse":
        return await _send_stream(srv, writer, _events(srv, [content]), sep=b"\r\n", extra=attribution)
    if mode == "tiny_chunks":
        return await _send_stream(srv, writer, _events(srv, [content]), extra=attribution, byte_by_byte=True)
    if mode == "many_events":
        text = content + " " * max(0, 5000 - len(content))
        return await _send_stream(srv, writer, _events(srv, list(text)), extra=attribution)
    if mode == "sse_comments":
        commented: list[bytes] = []
        for line in _events(srv, [content[: len(content) // 2], content[len(content) // 2:]]):
            commented += [b": keep-alive", line]
        return await _send_stream(srv, writer, commented, extra=attribution)
    raise ValueError(f"not an extra mode: {mode}")
