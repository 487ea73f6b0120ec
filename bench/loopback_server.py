"""A minimal, fast OpenAI-compatible chat server for loopback benchmarks of load generators.

It answers `POST /v1/chat/completions` (streaming SSE or not) with a fixed number of tokens and
an optional delay per token, and stamps its own true timings of every request:

    t_recv   the request was fully received (headers and body, before parsing the body)
    t_first  the first content token was handed to the kernel
    t_last   the last content token was handed to the kernel
    t_end    the response was complete ([DONE] and the chunked terminator written)

Send times are stamped right before the socket write: a stamp taken after it can come late,
because the write wakes the client, which the kernel may run first on a busy machine.

A load generator's reported TTFT and end-to-end latency are compared with `t_first - t_recv` and
`t_end - t_recv`; the difference is what the client adds (its send path, its event-loop lag,
its parsing). Timings are kept in memory keyed by the completion id (`chatcmpl-lb<n>`, also the
`x-request-id` header and part of the generated text) and fetched with `GET /bench/timings`
(`?clear=1` empties the log); `GET /bench/stats` tells the server's own CPU seconds. `POST /bench/config` with `{"token_delay_ms": 5, "tokens": 20}`
changes the generation between runs, so every client is measured against the same endpoint.

The generated text is a JSON object carrying the completion id, so a structured-output client
that validates answers sees a valid answer (schema `{"type": "object"}`).

HTTP/1.1 only, keep-alive, Content-Length request bodies, one request at a time per connection;
written on raw asyncio protocols (uvloop when installed) so the server costs little CPU and the
client is what gets measured. Not a general server: bind it to 127.0.0.1.

    python bench/loopback_server.py --port 8765 [--token-delay-ms 5] [--tokens 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

try:  # the fast path of a benchmark server: orjson when the interpreter has it
    import orjson

    _fast_loads, _fast_dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    _fast_loads = _fast_dumps = None

ATTRIBUTION_HEADER = b"x-guided-ab-backend"  # what guided_ab.load.client reads as the resolved backend
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class GenConfig:
    token_delay_s: float = 0.0
    tokens: int = 20
    model: str = "loopback"
    # a program: [[count, token_delay_s], ...] applied to the next chat requests in arrival order
    # (for a client that runs several scenarios in one process, e.g. guidellm's sub-benchmarks);
    # when it is used up, token_delay_s applies again
    program: list[list[float]] | None = None

    def next_delay(self) -> float:
        while self.program:
            step = self.program[0]
            if step[0] >= 1:
                step[0] -= 1
                return step[1]
            self.program.pop(0)
        return self.token_delay_s


class Server:
    """Shared state: generation settings, the id counter and the timing log."""

    def __init__(self, cfg: GenConfig):
        self.cfg = cfg
        self.counter = 0
        self.timings: list[tuple] = []  # (id, stream, n_tokens, delay_s, t_recv, t_first, t_last, t_end, ok)
        self.open_streams = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"chatcmpl-lb{self.counter}"

    def timings_json(self, clear: bool) -> bytes:
        keys = ("id", "stream", "tokens", "delay_s", "t_recv", "t_first", "t_last", "t_end", "ok")
        rows = [dict(zip(keys, t)) for t in self.timings]
        if clear:
            self.timings = []
        return json.dumps(rows).encode()


def _pieces(rid: str, n: int) -> list[str]:
    """n content tokens that together form a JSON object naming the completion id."""
    if n < 4:
        return ["x"] * n
    return ['{"id": ', json.dumps(rid), ', "pad": "', *(["tok "] * (n - 4)), '"}']


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _dumps(obj: Any) -> bytes:
    return _fast_dumps(obj) if _fast_dumps else json.dumps(obj, separators=(",", ":")).encode()


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + _dumps(obj) + b"\n\n")


_DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            411: b"Length Required", 413: b"Payload Too Large", 431: b"Request Header Fields Too Large"}


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: Server):
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a response is being streamed on this connection
        self.closed = False
        self.keep_alive = True
        self.task: asyncio.Task | None = None

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    # -- parsing ---------------------------------------------------------------------------------
    def _process(self) -> None:
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER_BYTES:
                    self._simple(431, b'{"error":"headers too large"}', close=True)
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, version = head[0].split(" ", 2)
            except ValueError:
                self._simple(400, b'{"error":"bad request line"}', close=True)
                return
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._simple(411, b'{"error":"send a Content-Length body"}', close=True)
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._simple(400, b'{"error":"bad Content-Length"}', close=True)
                return
            if length > MAX_BODY_BYTES:
                self._simple(413, b'{"error":"body too large"}', close=True)
                return
            if len(self.buf) < end + 4 + length:
                return  # wait for the rest of the body
            t_recv = time.time()
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            conn = headers.get("connection", "").lower()
            self.keep_alive = conn != "close" and (version == "HTTP/1.1" or conn == "keep-alive")
            self._route(method, target, body, t_recv)

    def _route(self, method: str, target: str, body: bytes, t_recv: float) -> None:
        path, _, query = target.partition("?")
        if path == "/v1/chat/completions" and method == "POST":
            self._chat(body, t_recv)
        elif path in ("/health", "/v1/health") and method == "GET":
            self._simple(200, b"{}")
        elif path == "/v1/models" and method == "GET":
            model = self.server.cfg.model
            self._simple(200, json.dumps({"object": "list", "data": [
                {"id": model, "object": "model", "owned_by": "loopback", "created": 0}]}).encode())
        elif path == "/bench/timings" and method == "GET":
            self._simple(200, self.server.timings_json(clear="clear=1" in query))
        elif path == "/bench/stats" and method == "GET":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            self._simple(200, json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "requests": self.server.counter,
                                          "open_streams": self.server.open_streams, "time": time.time()}).encode())
        elif path == "/bench/config" and method == "POST":
            try:
                data = json.loads(body or b"{}")
                if "token_delay_ms" in data:
                    self.server.cfg.token_delay_s = max(0.0, float(data["token_delay_ms"])) / 1000
                if "tokens" in data:
                    self.server.cfg.tokens = max(1, int(data["tokens"]))
                if "program" in data:
                    self.server.cfg.program = [[int(n), max(0.0, float(ms)) / 1000] for n, ms in data["program"] or []]
            except (ValueError, TypeError) as err:
                self._simple(400, json.dumps({"error": str(err)}).encode())
                return
            cfg = self.server.cfg
            self._simple(200, json.dumps({"token_delay_ms": cfg.token_delay_s * 1000, "tokens": cfg.tokens,
                                          "program": [[n, d * 1000] for n, d in cfg.program or []],
                                          "open_streams": self.server.open_streams}).encode())
        elif path in ("/v1/chat/completions", "/health", "/v1/models", "/bench/timings", "/bench/config",
                      "/bench/stats"):
            self._simple(405, b'{"error":"method not allowed"}')
        else:
            self._simple(404, b'{"error":"not found"}')

    # -- responses -------------------------------------------------------------------------------
    def _simple(self, status: int, payload: bytes, *, close: bool = False, extra: bytes = b"") -> None:
        if self.closed or self.transport is None:
            return
        close = close or not self.keep_alive
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n"
                % (status, _REASONS.get(status, b"Error"), len(payload), extra,
                   b"connection: close\r\n" if close else b""))
        self.transport.write(head + payload)
        if close:
            self.buf.clear()
            self.transport.close()
            self.closed = True

    def _chat(self, body: bytes, t_recv: float) -> None:
        try:
            req = _fast_loads(body) if _fast_loads else json.loads(body)
            if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
                raise ValueError("'messages' must be a list")
        except ValueError as err:
            self._simple(400, json.dumps({"error": {"message": f"bad request: {err}", "code": 400}}).encode())
            return
        cfg = self.server.cfg
        n = cfg.tokens
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            n = min(n, limit)
        rid = self.server.next_id()
        model = req.get("model") or cfg.model
        prompt_chars = sum(len(str(m.get("content", ""))) for m in req["messages"] if isinstance(m, dict))
        usage = {"prompt_tokens": max(1, prompt_chars // 4), "completion_tokens": n, "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        delay = cfg.next_delay()
        pieces = _pieces(rid, n)
        extra = b"x-request-id: %s\r\n%s: loopback\r\n" % (rid.encode(), ATTRIBUTION_HEADER)
        if not req.get("stream"):
            self._nonstream(rid, model, pieces, usage, t_recv, extra, delay)
            return
        opts = req.get("stream_options") or {}
        stream = _Stream(self, rid, model, pieces, usage, t_recv, delay,
                         include_usage=bool(opts.get("include_usage")),
                         continuous=bool(opts.get("continuous_usage_stats")))
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n%s%s\r\n" % (extra, b"" if self.keep_alive else b"connection: close\r\n"))
        self.transport.write(head)  # type: ignore[union-attr]
        self.busy = True
        self.server.open_streams += 1
        if delay <= 0:
            stream.run_now()
        else:
            self.task = asyncio.get_running_loop().create_task(stream.run_paced())

    def _nonstream(self, rid: str, model: str, pieces: list[str], usage: dict, t_recv: float, extra: bytes,
                   delay: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay * len(pieces))
            self._finish_nonstream(rid, model, pieces, usage, t_recv, extra, delay)
            self.busy = False
            self._process()

        if delay <= 0:
            self._finish_nonstream(rid, model, pieces, usage, t_recv, extra, delay)
        else:
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(later())

    def _finish_nonstream(self, rid: str, model: str, pieces: list[str], usage: dict, t_recv: float, extra: bytes,
                          delay: float) -> None:
        if self.closed:
            self.server.timings.append((rid, False, len(pieces), delay, t_recv, None, None, None, False))
            return
        payload = json.dumps({
            "id": rid, "object": "chat.completion", "created": int(t_recv), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": "stop"}],
            "usage": usage,
        }).encode()
        t = time.time()
        self._simple(200, payload, extra=extra)
        self.server.timings.append((rid, False, len(pieces), delay, t_recv, t, t, t, True))

    def stream_done(self, *, resume: bool) -> None:
        """The response is complete; resume=True (from a task) parses what arrived meanwhile."""
        self.busy = False
        self.task = None
        self.server.open_streams -= 1
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
            self.closed = True
        elif resume and self.buf:
            self._process()


class _Stream:
    """One streamed answer: its SSE events and its timings."""

    __slots__ = ("proto", "rid", "pieces", "usage", "t_recv", "delay", "include_usage", "continuous", "prefix",
                 "model", "head")

    def __init__(self, proto: HttpProtocol, rid: str, model: str, pieces: list[str], usage: dict, t_recv: float,
                 delay: float, *, include_usage: bool, continuous: bool):
        self.proto, self.rid, self.model, self.pieces, self.usage = proto, rid, model, pieces, usage
        self.t_recv, self.delay, self.include_usage, self.continuous = t_recv, delay, include_usage, continuous
        self.prefix = {"id": rid, "object": "chat.completion.chunk", "created": int(t_recv), "model": model}
        self.head = _dumps(self.prefix)[:-1]  # '{"id":...,"model":"..."' without the closing brace

    def _token_event(self, k: int) -> bytes:
        # bytes templates, not a JSON encoder per token: the server must stay far faster than a client
        if k == 0:
            delta = b'{"role":"assistant","content":' + _dumps(self.pieces[0]) + b"}"
        else:
            delta = b'{"content":' + _dumps(self.pieces[k]) + b"}"
        usage = b""
        if self.continuous:
            p = self.usage["prompt_tokens"]
            usage = b',"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (p, k + 1, p + k + 1)
        return _chunk(b"data: %s,\"choices\":[{\"index\":0,\"delta\":%s,\"finish_reason\":null}]%s}\n\n"
                      % (self.head, delta, usage))

    def _tail(self) -> bytes:
        out = _event({**self.prefix, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if self.include_usage:
            out += _event({**self.prefix, "choices": [], "usage": self.usage})
        return out + _DONE

    def _write(self, data: bytes) -> float | None:
        """Write to the connection; the time right before the write, or None if it is closed."""
        p = self.proto
        if p.closed or p.transport is None or p.transport.is_closing():
            return None
        t = time.time()
        p.transport.write(data)
        return t

    def run_now(self) -> None:
        """No delay: the whole answer in one write (one TCP send), as a server does when tokens are ready."""
        data = b"".join([self._token_event(k) for k in range(len(self.pieces))]) + self._tail()
        t = self._write(data)
        self.proto.server.timings.append((self.rid, True, len(self.pieces), 0.0, self.t_recv, t, t, t, t is not None))
        self.proto.stream_done(resume=False)

    async def run_paced(self) -> None:
        """Token k is written at t_recv + (k+1) * delay (a fixed schedule: no drift from sleep overshoot)."""
        loop = asyncio.get_running_loop()
        start = loop.time() - (time.time() - self.t_recv)
        t_first = t_last = t_end = None
        try:
            for k in range(len(self.pieces)):
                wait = start + (k + 1) * self.delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                t_last = self._write(self._token_event(k))
                if t_last is None:
                    break
                if k == 0:
                    t_first = t_last
            else:
                t_end = self._write(self._tail())
        except asyncio.CancelledError:
            t_end = None
        finally:
            self.proto.server.timings.append((self.rid, True, len(self.pieces), self.delay, self.t_recv, t_first, t_last,
                                              t_end, t_end is not None))
            self.proto.stream_done(resume=True)


async def serve(host: str, port: int, cfg: GenConfig, port_file: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = Server(cfg)
    srv = await loop.create_server(lambda: HttpProtocol(state), host, port, backlog=1024, reuse_address=True)
    real_port = srv.sockets[0].getsockname()[1]
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(real_port))
        os.replace(tmp, port_file)
    print(f"loopback server on http://{host}:{real_port} (tokens={cfg.tokens}, "
          f"token_delay_ms={cfg.token_delay_s * 1000:g})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with srv:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--token-delay-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--model", default="loopback")
    ap.add_argument("--no-uvloop", action="store_true")
    a = ap.parse_args(argv)
    cfg = GenConfig(token_delay_s=a.token_delay_ms / 1000, tokens=a.tokens, model=a.model)
    coro = serve(a.host, a.port, cfg, a.port_file)
    if not a.no_uvloop:
        try:
            import uvloop

            uvloop.run(coro)
            return
        except ImportError:
            pass
    asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
