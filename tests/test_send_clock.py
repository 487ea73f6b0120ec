"""The send clock (guided_ab.load.send_clock): an open loop's request is written at once but for its
last byte, which a clock process writes at the scheduled instant; a cancelled request never
completes on the server, and the clock's copies of the connections close with them.

A raw TCP server in a thread stamps when each request's first byte and its last byte arrived, so
the test sees what the server saw, not what the client believes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

from guided_ab.load.client import chat_body, new_session, send_chat
from guided_ab.load.send_clock import SendClock

ANSWER = json.dumps({"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()


class StampingServer:
    """Accepts connections; per request: wall-clock time of its first and of its last byte. Answers
    each complete request with a chat completion (keep-alive); notes when a connection ends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[dict[str, float]] = []
        self.closed: list[float] = []
        self.partial: list[int] = []  # bytes of a request a connection had when it ended unfinished
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, first = b"", None
        with conn:
            while True:
                data = conn.recv(65536)
                now = time.time()
                if not data:
                    self.closed.append(now)
                    if buf:
                        self.partial.append(len(buf))
                    return
                first = first or now
                buf += data
                head, sep, body = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(body) < length:
                    continue
                self.requests.append({"first": first, "last": now})
                buf, first = body[length:], None
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def server():
    s = StampingServer()
    yield s
    s.close()


def _body() -> dict:
    return chat_body("m", "hello", {"type": "object"}, name="s", temperature=0.0, max_tokens=4, stream=False)


def test_a_held_request_is_written_at_once_and_completed_at_its_instant(server):
    async def main():
        async with SendClock() as clock, new_session(4, clock=clock) as http:
            t_call = time.time()
            due = time.perf_counter() + 0.4
            raw = await send_chat(http, server.url, _body(), api_key=None, timeout_s=10, not_before=due)
            return t_call, due - time.perf_counter() + time.time(), raw

    t_call, due_wall, raw = asyncio.run(main())
    assert raw.http_status == 200 and raw.failure is None, raw
    [req] = server.requests
    assert req["first"] - t_call < 0.2  # the request went out at once...
    assert req["last"] >= due_wall - 0.002  # ...but was complete only at its instant
    assert req["last"] - due_wall < 0.1
    assert raw.sent_at == pytest.approx(req["last"], abs=0.02)  # sent_at: when the last byte went


def test_a_request_cancelled_while_held_never_completes_and_its_connection_closes(server):
    pids: list[int] = []

    async def main():
        async with SendClock() as clock, new_session(4, clock=clock) as http:
            assert clock._proc is not None
            pids.append(clock._proc.pid)
            task = asyncio.ensure_future(send_chat(http, server.url, _body(), api_key=None, timeout_s=10,
                                                   not_before=time.perf_counter() + 1.5))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)
            return time.time()  # the clock still runs: it must not keep the connection open

    clock_alive_until = asyncio.run(main())
    time.sleep(1.0)  # past the instant it was held for
    assert server.requests == []  # the server never had it whole
    assert server.partial and server.partial[0] > 100  # it had all but the last byte...
    assert server.closed and server.closed[0] < clock_alive_until  # ...and saw the connection end at once
    with pytest.raises(ProcessLookupError):  # the clock process ended with its phase
        os.kill(pids[0], 0)


def test_a_reused_connection_holds_each_of_its_requests_until_its_instant(server):
    async def main():
        async with SendClock() as clock, new_session(1, clock=clock) as http:  # one connection, reused
            start = time.perf_counter() + 0.05
            dues = [start + 0.05 * i for i in range(6)]
            to_wall = time.time() - time.perf_counter()
            raws = await asyncio.gather(*(send_chat(http, server.url, _body(), api_key=None, timeout_s=10,
                                                    not_before=d) for d in dues))
            return raws, [d + to_wall for d in dues]

    raws, due_walls = asyncio.run(main())
    assert [r.http_status for r in raws] == [200] * 6
    assert len(server.requests) == 6
    for raw, due in zip(raws, due_walls):
        assert raw.sent_at >= due - 0.002  # never before its instant (a late one is recorded late)
    assert sorted(r["last"] for r in server.requests)[-1] >= due_walls[-1] - 0.002


def test_a_clock_that_dies_mid_phase_stops_it_and_a_rerun_sends_the_rest(loopback, tmp_path):
    """Its held requests never went out: the phase fails naming the clock, keeps what it recorded
    (no record with a made-up send time or a false connection error), and a re-run completes it."""
    import signal
    import subprocess

    from loopback_run import loopback_run

    from guided_ab.config import LoadProfile, Workload
    from guided_ab.load.runner import run_plan
    from guided_ab.load.send_clock import SendClockStopped, loop_runner
    from guided_ab.plan import make_plan
    from guided_ab.workload import WorkItem

    items = [WorkItem(schema_id=f"s{i:03d}", subset="t", prompt=f"request {i}", json_schema={"type": "object"})
             for i in range(40)]
    plan = make_plan("ab", ["a"], items, seed=3)
    store, endpoints = loopback_run(loopback, tmp_path, "clock-dies", arms=("a",))
    wl = Workload(max_tokens=8, timeout_s=30, seed=11)
    load = LoadProfile(profile="constant", rate=20, max_in_flight=8, count=40)  # 2 s of arrivals

    def kill_the_clock():
        time.sleep(0.8)
        out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "send_clock.py"], capture_output=True, text=True)
        for pid in out.stdout.split():
            os.kill(int(pid), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_clock)
    killer.start()
    with pytest.raises(SendClockStopped, match="re-running the phase sends the rest"):
        loop_runner(open_loop=True)(run_plan(plan, endpoints, store, wl, load=load))
    killer.join()
    first = store.journal("ab")
    assert 5 <= len(first) < 40
    assert {r.outcome for r in first} == {"success"}
    assert all(abs(r.send_lag_s) < 0.5 for r in first)

    result = loop_runner(open_loop=True)(run_plan(plan, endpoints, store, wl, load=load))
    assert result.recorded == 40
    recs = store.journal("ab")
    assert sorted(r.request_id for r in recs) == sorted(r.request_id for r in plan.requests)  # one each
    assert {r.outcome for r in recs} == {"success"}


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key (PEM files), made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_over_tls_the_held_byte_holds_the_whole_request_until_its_instant(tmp_path):
    """Modal arms answer over HTTPS: the held byte is the last of the TLS record, which the server
    cannot decrypt before it has it all, so the request arrives at its instant there too."""
    import ssl

    import aiohttp

    from guided_ab.load import client

    cert_file, key_file = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)

    class TLSServer(StampingServer):
        def _serve(self, conn):
            try:
                conn = server_ctx.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                return
            super()._serve(conn)

    server = TLSServer()
    try:
        async def main():
            async with SendClock() as clock:
                connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(cert_file)),
                                                 socket_factory=clock.socket_factory)
                async with aiohttp.ClientSession(connector=connector, trace_configs=[client._held_trace(clock)]) as http:
                    t_call = time.time()
                    due = time.perf_counter() + 0.4
                    raw = await send_chat(http, server.url.replace("http:", "https:"), _body(), api_key=None,
                                          timeout_s=10, not_before=due)
                    return t_call, due - time.perf_counter() + time.time(), raw

        t_call, due_wall, raw = asyncio.run(main())
    finally:
        server.close()
    assert raw.http_status == 200 and raw.failure is None, raw
    [req] = server.requests
    assert req["last"] >= due_wall - 0.002  # decrypted only once the held byte came
    assert req["last"] - due_wall < 0.1
    assert raw.sent_at == pytest.approx(req["last"], abs=0.02)


def test_requests_are_prepared_ahead_without_spending_the_cap():
    """A held request counts against max_in_flight: the preparation window shrinks so that at most a
    quarter of the cap waits for its instant (never under PREPARE_S); without a clock, PREPARE_S."""
    from guided_ab.load.runner import PREPARE_CLOCKED_S, PREPARE_S, prepare_ahead

    def schedule(rate: float, n: int = 100, per_arrival: int = 1):
        return [(i / rate, [object()] * per_arrival) for i in range(n)]

    assert prepare_ahead(schedule(500), 256, clocked=True) == PREPARE_CLOCKED_S  # 500/s, 256 in flight: 100 ms
    assert prepare_ahead(schedule(2, per_arrival=2), 16, clocked=True) == PREPARE_CLOCKED_S
    assert prepare_ahead(schedule(100), 8, clocked=True) == pytest.approx(0.02, rel=0.02)  # 2 of 8 slots held
    assert prepare_ahead(schedule(50, per_arrival=2), 8, clocked=True) == pytest.approx(0.02, rel=0.02)
    assert prepare_ahead(schedule(5000), 4, clocked=True) == PREPARE_S
    assert prepare_ahead(schedule(500), 256, clocked=False) == PREPARE_S
