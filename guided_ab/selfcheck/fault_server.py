"""A small OpenAI-compatible chat server for loopback fault tests (stdlib only: asyncio streams).

It does on demand what a real vLLM cannot: a 503 storm while "cold starting", stalls past the
client's timeout, connection resets, malformed or cut SSE streams, HTTP 200 with a non-JSON
body, slow trickle streams. Healthy answers are schema-valid JSON (a minimal instance generated
from the request's schema) and carry the backend attribution header that guided_ab.in_server.attribution
sets inside a real vLLM server.

Modes (`MODES`), chosen per server (constructor / `--mode`) or per request: a header
`x-guided-ab-fault: <mode>`, or a schema name containing `fault-<mode>` (so a workload file
`fault-stall.json` makes the server stall on exactly that schema, whatever the server's mode).

    healthy        schema-valid answer (after `delay_s`)
    storm          HTTP 503 for the first `storm_requests` chat requests, then healthy;
                   GET /v1/models and /health answer 503 for `cold_start_s` seconds from the
                   first request (a scaled-to-zero endpoint cold-starting when first called)
    stall          no answer (non-streaming) / one event then silence (streaming) for `stall_s`
    reset          the connection is reset (RST) once the request is read
    malformed_sse  a stream with an event that is not JSON (non-streaming: a truncated JSON body)
    cut_sse        the stream (or body) stops half-way and the connection closes
    non_json       HTTP 200 with an HTML body, streaming or not
    trickle        a valid answer sent in `pieces` pieces, `trickle_s` apart
    truncated      half an answer with finish_reason "length"
    wrong          valid JSON that is not an instance of an object schema
    reject         HTTP 400 with a grammar error, as vLLM answers a schema it cannot compile
    garbage        bytes that are not HTTP at all
    ...            and the modes of guided_ab.selfcheck.fault_extra (EXTRA_MODES)

Every /v1/ path needs `Authorization: Bearer <api_key>` when the server has a key (401
otherwise, without echoing what was sent); /health does not, as in vLLM.

In a thread: `with FaultServer("stall", api_key=k) as srv: srv.url`. In a process (so a test can
SIGKILL it): `spawn("healthy", api_key=k)`, or `python -m guided_ab.selfcheck.fault_server --mode healthy
--key-env NAME` (the key comes from the environment, never from the command line), which prints
`listening <url>` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from http import HTTPStatus
from typing import Any

from guided_ab.selfcheck.fault_extra import EXTRA_MODES, respond
from guided_ab.selfcheck.fault_process import FaultProcess, spawn
from guided_ab.selfcheck.instances import minimal_instance

__all__ = ["ALL_MODES", "ATTRIBUTION_HEADER", "FAULT_HEADER", "MODES", "FaultProcess", "FaultServer", "main", "minimal_instance", "spawn"]

# the same header guided_ab.arms.vllm_args.ATTRIBUTION_HEADER names (not imported: this module must
# start fast and without the package's dependencies when it runs as a subprocess)
ATTRIBUTION_HEADER = "x-guided-ab-backend"
FAULT_HEADER = "x-guided-ab-fault"
MODES = (
    "healthy", "storm", "stall", "reset", "malformed_sse", "cut_sse", "non_json", "trickle",
    "truncated", "wrong", "reject", "garbage",
)
ALL_MODES = MODES + EXTRA_MODES
MAX_BODY = 64 * 1024 * 1024
_SCHEMA_MODE = re.compile(r"fault-([a-z0-9_]+)")


# -- the server --------------------------------------------------------------------------------
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(obj: Any) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class FaultServer:
    """One fault-injecting server. `start()` runs it on a loop in a daemon thread."""

    def __init__(
        self,
        mode: str = "healthy",
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "guidance",
        model: str = "guided-ab-model",
        storm_requests: int = 3,
        cold_start_s: float = 0.0,
        stall_s: float = 600.0,
        trickle_s: float = 0.05,
        pieces: int = 4,
        delay_s: float = 0.0,
        evil_length: int = 28,
        redirect_to: str = "",
    ):
        if mode not in ALL_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; modes are {ALL_MODES}")
        self.mode = mode
        self.api_key = api_key
        self.host = host
        self.port = port
        self.backend = backend
        self.model = model
        self.storm_requests = storm_requests
        self.cold_start_s = cold_start_s
        self.stall_s = stall_s
        self.trickle_s = trickle_s
        self.pieces = max(1, pieces)
        self.delay_s = delay_s
        self.evil_length = evil_length
        self.redirect_to = redirect_to
        self.stats: Counter = Counter()  # "chat", "mode:<m>", "status:<n>", "unauthorized", ...
        self._storm_left = storm_requests
        self._first_request_at: float | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve(self) -> None:
        """Listen (port 0 = a free port; `self.port` is set once listening)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def start(self) -> FaultServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.serve())
            except BaseException as err:  # noqa: BLE001 - reported to start()
                errors.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-server-{self.mode}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()  # the connection's task (a start_server callback always has one)
        if task is not None:
            self._conns.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                await self._send(writer, 400, {"error": {"message": "bad request line"}}, close=True)
                return
            method, target, _ = parts
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                await self._send(writer, 411, {"error": {"message": "send a Content-Length"}}, close=True)
                return
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                await self._send(writer, 413, {"error": {"message": "body too large"}}, close=True)
                return
            body = await reader.readexactly(length) if length else b""
            self.stats["requests"] += 1
            keep = await self._route(method, target.split("?")[0], headers, body, reader, writer)
            if not keep or headers.get("connection", "").lower() == "close":
                return

    async def _send(self, writer, status: int, payload: Any, *, content_type: str = "application/json",
                    extra: dict[str, str] | None = None, close: bool = False) -> bool:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.stats[f"status:{status}"] += 1
        head = [f"HTTP/1.1 {status} {_reason(status)}", f"content-type: {content_type}", f"content-length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if close:
            head.append("connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return not close

    def _authorized(self, headers: dict[str, str]) -> bool:
        if not self.api_key:
            return True
        got = headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    def _cold(self) -> bool:
        if self.mode != "storm":
            return False
        if self._first_request_at is None:
            self._first_request_at = time.monotonic()
        cold = time.monotonic() - self._first_request_at < self.cold_start_s
        self.stats["cold"] += cold
        return cold

    async def _route(self, method: str, path: str, headers: dict, body: bytes, reader, writer) -> bool:
        if path == "/health":
            return await self._send(writer, 503 if self._cold() else 200, b"", content_type="text/plain")
        if path.startswith("/v1/") and not self._authorized(headers):
            self.stats["unauthorized"] += 1
            return await self._send(writer, 401, {"error": "Unauthorized"})
        if path == "/v1/models" and method == "GET":
            if self._cold():
                return await self._send(writer, 503, {"error": {"message": "cold start: the model is loading"}})
            return await self._send(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(headers, body, reader, writer)
        return await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})

    # -- chat completions -----------------------------------------------------------------------
    def _request_mode(self, headers: dict, req: dict) -> str:
        m = headers.get(FAULT_HEADER)
        if m in ALL_MODES:
            return m
        rf = req.get("response_format")
        js = rf.get("json_schema") if isinstance(rf, dict) else None
        name = js.get("name") if isinstance(js, dict) else None
        found = _SCHEMA_MODE.search(name) if isinstance(name, str) else None
        if found and found.group(1) in ALL_MODES:
            return found.group(1)
        return self.mode

    @staticmethod
    def _schema(req: dict) -> Any:
        rf = req.get("response_format")
        if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
            return rf["json_schema"].get("schema", {})
        so = req.get("structured_outputs")
        if isinstance(so, dict) and "json" in so:
            return so["json"]
        return {}

    async def _chat(self, headers: dict, body: bytes, reader, writer) -> bool:
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            return await self._send(writer, 400, {"error": {"message": "the body is not a JSON object"}})
        mode = self._request_mode(headers, req)
        self.stats["chat"] += 1
        self.stats[f"mode:{mode}"] += 1
        stream = bool(req.get("stream"))
        if mode == "storm":
            if self._storm_left > 0:
                self._storm_left -= 1
                return await self._send(writer, 503, {"error": {"message": "cold start: no replica ready yet"}})
            mode = "healthy"
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if mode == "garbage":
            writer.write(b"this is not HTTP\r\n\r\n\x00\xff")
            await writer.drain()
            return False
        if mode == "reject":
            return await self._send(writer, 400, {"error": {
                "message": "Grammar error: the fault server refuses to compile this schema",
                "type": "BadRequestError", "code": 400}})
        if mode == "non_json":
            return await self._send(writer, 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                                    content_type="text/html")
        if mode == "stall" and not stream:
            await self._stall(reader)
            return False
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        try:
            instance = minimal_instance(self._schema(req))
            content = json.dumps(instance, separators=(",", ":"))
        except (RecursionError, TypeError, ValueError):
            content = "{}"
        if mode in EXTRA_MODES:
            return await respond(self, mode, headers, req, content, reader, writer)
        finish = "stop"
        if mode == "truncated":
            content, finish = content[: max(1, len(content) // 2)], "length"
        elif mode == "wrong":
            content = '"not an instance of the schema"'
        prompt_tokens = max(1, len(body) // 4)
        n = self.pieces if mode != "trickle" else max(self.pieces, 2)
        step = max(1, math.ceil(len(content) / n))
        pieces = [content[i:i + step] for i in range(0, len(content), step)] or [""]
        n_tokens = len(pieces)
        if mode == "truncated" and isinstance(req.get("max_tokens"), int):
            n_tokens = req["max_tokens"]  # as a real server: "length" means the answer used all its max_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                 "total_tokens": prompt_tokens + n_tokens}
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        if not stream:
            if mode == "trickle":
                await asyncio.sleep(self.trickle_s * len(pieces))
            answer = {
                "id": cid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": usage,
            }
            data = json.dumps(answer).encode()
            if mode == "malformed_sse":
                data = data[: len(data) // 2]  # a 200 whose JSON body ends half-way
            if mode == "cut_sse":  # promise the whole body, send half, hang up
                head = (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                        f"{ATTRIBUTION_HEADER}: {self.backend}\r\n\r\n").encode()
                writer.write(head + data[: len(data) // 2])
                await writer.drain()
                writer.close()
                return False
            return await self._send(writer, 200, data, extra={ATTRIBUTION_HEADER: self.backend})

        head = ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
                f"{ATTRIBUTION_HEADER}: {self.backend}\r\n\r\n").encode()
        self.stats["status:200"] += 1
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model}

        def delta(d: dict, fin: str | None = None) -> bytes:
            return _event({**base, "choices": [{"index": 0, "delta": d, "finish_reason": fin}]})

        writer.write(head + delta({"role": "assistant", "content": ""}))
        await writer.drain()
        for i, piece in enumerate(pieces):
            if mode == "trickle":
                await asyncio.sleep(self.trickle_s)
            if mode == "malformed_sse" and i == 1:
                writer.write(_chunk(b'data: {"choices": [{"delta": {"content": "x"}\n\n'))  # JSON cut short
                continue
            writer.write(delta({"content": piece}))
            await writer.drain()
            if mode == "stall":  # one event, then silence
                await self._stall(reader)
                return False
            if mode == "cut_sse" and i == len(pieces) // 2:
                writer.close()  # no final event, no terminating chunk
                return False
        writer.write(delta({}, finish))
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            writer.write(_event({**base, "choices": [], "usage": usage}))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _stall(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client gives up (its timeout closes the connection) or stall_s."""
        self.stats["stalled"] += 1
        try:
            async with asyncio.timeout(self.stall_s):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m guided_ab.selfcheck.fault_server", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="healthy", choices=ALL_MODES)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--key-env", default=None, help="environment variable holding the API key")
    ap.add_argument("--backend", default="guidance")
    ap.add_argument("--storm-requests", type=int, default=3)
    ap.add_argument("--cold-start-s", type=float, default=0.0)
    ap.add_argument("--stall-s", type=float, default=600.0)
    ap.add_argument("--trickle-s", type=float, default=0.05)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--evil-length", type=int, default=28)
    ap.add_argument("--redirect-to", default="")
    a = ap.parse_args(argv)
    key = os.environ.get(a.key_env) if a.key_env else None
    if a.key_env and not key:
        ap.error(f"--key-env {a.key_env}: the variable is not set")
    srv = FaultServer(a.mode, api_key=key, host=a.host, port=a.port, backend=a.backend,
                      storm_requests=a.storm_requests, cold_start_s=a.cold_start_s, stall_s=a.stall_s,
                      trickle_s=a.trickle_s, pieces=a.pieces, delay_s=a.delay_s, evil_length=a.evil_length,
                      redirect_to=a.redirect_to)

    async def run() -> None:
        await srv.serve()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(f"listening {srv.url}\n")
        sys.stdout.flush()
        await stop.wait()
        await srv.aclose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
