"""Put each open-loop request on the wire at its scheduled instant, to within tens of microseconds.

Why a clock of its own: the open loop's event loop also reads answers, validates them and writes
the journal (~1.5 CPU ms per request, ~0.8 of a core at 500 requests/s). A send that falls due
while the loop runs another callback waits for it to end (~0.1-0.5 ms), so arrivals a fraction
of a millisecond apart went out back to back: the achieved inter-arrival times failed a
Kolmogorov-Smirnov test against the exponential (D=0.045 over 5,000 gaps, where a sleeping
process alone gets 0.008; bench/open_loop_accuracy.py). A thread does not help: it needs the
interpreter lock to write, and waits for it about as long (tried: D=0.034 with a 20 us switch
interval).

How (last-byte synchronisation, the trick HTTP race-condition testers use to land requests at
one instant): the client writes a held request at once, all but its final byte, through a
`HeldSocket`; that byte goes to `send_clock`, a small process that does nothing but sleep, spin
the last SPIN_S before each instant and write one byte on its own copy of the connection's file
descriptor (passed once per connection with SCM_RIGHTS). A server parses a request only once it
is complete, so the request arrives when that byte does. The clock stamps `perf_counter` (the
same CLOCK_MONOTONIC in every process) and the wall clock right before the write and sends them
back: they are the request's `sent_at`.

The hand-off is the request's first write on the connection: `arm(sent)` (client.py's trace
hook, right before aiohttp writes the headers and body in one transport write) marks the
request; the socket's `send`, called synchronously inside that write, holds the byte. This
needs asyncio's own event loop, whose transports write through the Python socket object (uvloop
writes from C, past it): `loop_runner` picks it for open-loop phases.

Hand-written because no library does it: a timing-accurate open loop over a keep-alive HTTP
client is not something aiohttp, httpx or guidellm offer.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import heapq
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# The clock sleeps until this long before an instant, then spins: a sleeping process wakes up
# 20-100 us late here, which alone skews short inter-arrival gaps (bench/open_loop_accuracy.py).
SPIN_S = 0.0003

# control messages, main -> clock: register a connection's fd (sent with it), hold a byte, forget
_REGISTER = struct.Struct("<cQ")         # b"R", connection id
_HOLD = struct.Struct("<cQQdc")          # b"H", connection id, token, due (perf_counter), the byte
_FORGET = struct.Struct("<cQ")           # b"F", connection id
# clock -> main: b"D" (written) | b"E" (write failed) | b"C" (cancelled), token, perf, wall
_DONE = struct.Struct("<cQdd")

class SendClockStopped(RuntimeError):
    """The clock process died mid-phase: the requests it held never went out."""


_ARMED: contextvars.ContextVar[Any] = contextvars.ContextVar("guided_ab_send_clock_armed", default=None)


def arm(clock: SendClock, sent: Any) -> None:
    """Mark `sent` (client._Sent: not_before, perf, wall, held, released) as the request whose
    next write on its connection is held for the clock. Call it in the request's task, right
    before the write. Once the clock has died nothing is armed: the request goes out unheld, and
    the runner keeps no record of it (clock.dead), so a re-run of the phase sends it again."""
    if clock.dead is None:
        _ARMED.set(sent)


def precise_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop's transports write through the socket object (asyncio's own loop does)."""
    return type(loop).__module__.startswith("asyncio")


def loop_runner(open_loop: bool) -> Callable[[Coroutine[Any, Any, T]], T]:
    """asyncio.run for an open loop (the clock needs its transports, see the module doc); uvloop
    otherwise (less CPU per request) where installed."""
    if open_loop:
        return asyncio.run
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional (not on Windows)
        return asyncio.run
    return uvloop.run


class SendClock:
    """The main process's side: starts the clock process, hands it bytes, reads back when they went.

    Use inside the event loop that sends (`async with SendClock() as clock`); `socket_factory`
    goes to aiohttp.TCPConnector(socket_factory=...).
    """

    def __init__(self) -> None:
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, tuple[Any, HeldSocket]] = {}  # token -> (the request's _Sent, its socket)
        self._next_token = 0
        self._next_conn = 0
        self.dead: SendClockStopped | None = None  # set when the clock process died mid-phase

    async def __aenter__(self) -> SendClock:
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                          pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        # its first words say it is ready: until then (interpreter start-up, ~50-100 ms) it would
        # write every byte late
        ready = await self._loop.run_in_executor(None, _wait_ready, ours)
        if not ready:
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError("the send clock process did not start (see its error above)")
        ours.setblocking(False)
        self._ctl = ours
        self._loop.add_reader(ours.fileno(), self._on_replies)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ctl is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._ctl.fileno())
            self._ctl.close()  # the clock sees end-of-file, closes its copies of the connections and exits
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        for sent, sock in self._waiting.values():  # nothing more will come back: no request waits for it
            sock._held = False
            _release(sent)
        self._waiting.clear()

    def _died(self) -> None:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:  # it closed its end but lives on: close() ends it
                pass
        self.dead = SendClockStopped(
            f"the send clock process ended unexpectedly (exit code {code}; its error is above): the open loop "
            "cannot time its requests, so the phase stops here; what was recorded is kept, and re-running "
            "the phase sends the rest")
        for sent, sock in self._waiting.values():
            sock._held = False
            if sent.released is not None and not sent.released.done():
                sent.released.set_exception(self.dead)
                sent.released.exception()  # retrieved here: a cancelled request's future is not logged
        self._waiting.clear()
        self.close()

    def socket_factory(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        self._next_conn += 1
        return HeldSocket(self, self._next_conn, family, type_, proto)

    # -- used by HeldSocket ----------------------------------------------------------------------
    def _send_ctl(self, data: bytes, fds: list[int] | None = None) -> None:
        ctl = self._ctl
        if ctl is None:
            raise ConnectionError("the send clock is closed")
        deadline = time.monotonic() + 5
        while True:
            try:
                if fds:
                    socket.send_fds(ctl, [data], fds)
                else:
                    ctl.send(data)
                return
            except BlockingIOError:  # the clock is behind by thousands of messages: wait a little
                if time.monotonic() > deadline:
                    raise ConnectionError("the send clock does not answer") from None
                select.select([], [ctl], [], 0.01)

    def _hold(self, sock: HeldSocket, sent: Any, byte: bytes) -> None:
        if not sock._registered:
            self._send_ctl(_REGISTER.pack(b"R", sock._conn_id), [sock.fileno()])
            sock._registered = True
        self._next_token += 1
        token = self._next_token
        assert self._loop is not None
        sent.released = self._loop.create_future()
        sent.held = True
        self._waiting[token] = (sent, sock)
        due = sent.not_before if sent.not_before is not None else 0.0
        self._send_ctl(_HOLD.pack(b"H", sock._conn_id, token, due, byte))

    def _forget(self, sock: HeldSocket) -> None:
        if self._ctl is not None:
            self._send_ctl(_FORGET.pack(b"F", sock._conn_id))

    def _on_replies(self) -> None:
        ctl = self._ctl
        while ctl is not None:
            try:
                msg = ctl.recv(_DONE.size)
            except BlockingIOError:
                return
            if not msg:  # the clock process died: every request it held fails (SendClockStopped)
                self._died()
                return
            kind, token, perf, wall = _DONE.unpack(msg)
            entry = self._waiting.pop(token, None)
            if entry is None:
                continue
            sent, sock = entry
            sock._held = False
            if kind != b"C":  # written (or tried: a failed write is the connection's error, seen by the client)
                sent.perf, sent.wall = perf, wall
            _release(sent)


def _wait_ready(ctl: socket.socket) -> bool:
    ctl.settimeout(30)
    try:
        return ctl.recv(16) == b"ready"
    except OSError:
        return False


def _release(sent: Any) -> None:
    fut = getattr(sent, "released", None)
    if fut is not None and not fut.done():
        fut.set_result(None)


class HeldSocket(socket.socket):
    """A client socket whose armed write keeps its last byte for the clock (see the module doc).

    Everything else passes through: unarmed writes (none on an HTTP/1.1 connection while a byte
    is held: the answer cannot come before the request is whole) go out at once; a write while a
    byte is held reports nothing written, so asyncio keeps it and retries after the byte is out.
    """

    def __init__(self, clock: SendClock, conn_id: int, *args: Any) -> None:
        super().__init__(*args)
        self._clock = clock
        self._conn_id = conn_id
        self._registered = False
        self._held = False
        self._partial: Any = None  # an armed request whose write asyncio is finishing in pieces

    def send(self, data: Any, flags: int = 0) -> int:
        if self._held:
            return 0
        sent = self._partial or _ARMED.get()
        if sent is None:
            return super().send(data, flags)
        _ARMED.set(None)
        self._partial = sent
        view = memoryview(data)
        n = super().send(view[:-1], flags) if len(view) > 1 else 0
        if n < len(view) - 1:  # asyncio sends the rest when the socket can take it, this way again
            return n
        self._partial = None
        self._held = True
        self._clock._hold(self, sent, bytes(view[-1:]))
        return len(view)

    def sendmsg(self, buffers: Any, *args: Any) -> int:  # Python >= 3.12's transports write with it
        if self._held or self._partial is not None or _ARMED.get() is not None:
            return self.send(b"".join(buffers))
        return super().sendmsg(buffers, *args)

    def close(self) -> None:
        if self._registered:
            self._registered = False
            try:
                self._clock._forget(self)  # the clock closes its copy, so the connection really closes
            except ConnectionError:
                pass
        super().close()


# -- the clock process ---------------------------------------------------------------------------
def _outrank_parent() -> None:
    """Run ahead of everything else on the machine when the system allows it: the clock sleeps
    nearly all the time, and a byte written late is a late arrival. Under a normal policy a
    sleeper woken while both cores are busy waits for the scheduler (0.1-1 ms here, enough to fail
    the arrivals' test), so the clock asks for the lowest real-time priority (SCHED_FIFO 1, or one
    step above a real-time client); it sleeps between instants and spins at most SPIN_S, and the
    kernel's real-time throttling bounds it anyway. Not permitted (neither root nor CAP_SYS_NICE):
    a lower nice value; failing that, as it is (the records still carry each request's true lag)."""
    try:
        policy = os.sched_getscheduler(0)
        prio = os.sched_getparam(0).sched_priority if policy in (os.SCHED_FIFO, os.SCHED_RR) else 0
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(min(prio + 1, os.sched_get_priority_max(os.SCHED_FIFO))))
        return
    except (OSError, AttributeError):  # not permitted (or not Linux)
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except (OSError, AttributeError):
        pass


def _serve(fd: int) -> None:
    """The clock: hold bytes until their instant, write them, say when. Ends when the main process
    closes its end (or dies); its copies of the connections close with it."""
    ctl = socket.socket(fileno=fd)
    ctl.setblocking(True)
    try:  # PR_SET_TIMERSLACK = 29: wake from sleep at the time asked, not up to 50 us later
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    _outrank_parent()
    ctl.send(b"ready")
    fds: dict[int, int] = {}
    heap: list[tuple[float, int, int, bytes]] = []  # (due, token, connection, byte)
    perf = time.perf_counter

    def handle(msg: bytes, got: list[int]) -> bool:
        kind = msg[:1]
        if kind == b"H":
            _, conn, token, due, byte = _HOLD.unpack(msg)
            heapq.heappush(heap, (due, token, conn, byte))
        elif kind == b"R":
            _, conn = _REGISTER.unpack(msg)
            old = fds.pop(conn, None)
            if old is not None:
                os.close(old)
            fds[conn] = got.pop()
        elif kind == b"F":
            _, conn = _FORGET.unpack(msg)
            for item in [h for h in heap if h[2] == conn]:
                heap.remove(item)
                ctl.send(_DONE.pack(b"C", item[1], 0.0, 0.0))
            heapq.heapify(heap)
            old = fds.pop(conn, None)
            if old is not None:
                os.close(old)
        elif not msg:
            return False
        for extra in got:  # fds nobody asked for: never leak a connection
            os.close(extra)
        return True

    written: list[bytes] = []  # replies for bytes written, sent once no other byte is due soon
    while True:
        if heap and heap[0][0] - perf() <= SPIN_S:
            due, token, conn, byte = heapq.heappop(heap)
            while perf() < due:
                pass
            t, wall = perf(), time.time()
            kind = b"D"
            try:
                for _ in range(20_000):  # a full send buffer (never with one byte, but say what happens)
                    try:
                        os.write(fds[conn], byte)
                        break
                    except BlockingIOError:
                        time.sleep(0.00005)
            except (OSError, KeyError):
                kind = b"E"
            # the reply waits while another byte is due within SPIN_S: arrivals tens of
            # microseconds apart would otherwise be pushed apart by it (short gaps are Poisson's most likely)
            written.append(_DONE.pack(kind, token, t, wall))
            continue
        for msg in written:
            ctl.send(msg)
        written.clear()
        wait = None if not heap else max(0.0, heap[0][0] - perf() - SPIN_S)
        ready, _, _ = select.select([ctl], [], [], wait)
        if ready:
            msg, got, _, _ = socket.recv_fds(ctl, 64, 4)
            if not handle(msg, list(got)):
                break
    for f in fds.values():
        os.close(f)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
