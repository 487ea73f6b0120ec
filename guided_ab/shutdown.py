"""Ctrl-C that ends: a bounded shutdown for the commands that run flows.

A terminal's Ctrl-C sends SIGINT to the whole process group, and Prefect's temporary API
server is in it: it dies at once. Unwinding through Prefect then meets an API that is gone, and
Prefect's client retries each call with backoff (about a minute per call): the process stayed
alive for minutes, needed SIGKILL, and never wrote teardown.json, leaving local arms running.

So while a flow runs, the first SIGINT raises KeyboardInterrupt as usual (the requests stop,
what is recorded is kept) and arms a watchdog; the command's own handler, or the watchdog after
`grace_s` if unwinding has not ended by then, or a second Ctrl-C at once, runs `finish` (stop
the run's endpoints, write teardown.json, finalize the records: the run store alone, no Prefect)
exactly once and ends the process with status 130 (128 + SIGINT). Nothing here imports Prefect.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

GRACE_S = 20.0  # tasks/requests.py waits up to 10 s for the requests in flight to stop
EXIT_STATUS = 130


class BoundedShutdown:
    """`with BoundedShutdown(finish): run the flow`; then `finish_and_exit()` on KeyboardInterrupt."""

    def __init__(self, finish: Callable[[], None], *, grace_s: float = GRACE_S, say: Callable[[str], None] | None = None):
        self._finish = finish
        self.grace_s = grace_s
        self._say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self.fired = False
        self._old: object = None

    def __enter__(self) -> BoundedShutdown:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:  # a second Ctrl-C: no more waiting
            self._say("second interrupt: stopping now")
            self.finish_and_exit()
        self.fired = True
        self._say(f"interrupted: stopping the requests, then the endpoints (at most ~{self.grace_s:.0f} s; Ctrl-C again to hurry)")
        threading.Thread(target=self._watchdog, name="guided-ab-shutdown", daemon=True).start()
        raise KeyboardInterrupt

    def _watchdog(self) -> None:
        time.sleep(self.grace_s)
        self._say(f"still unwinding after {self.grace_s:.0f} s (Prefect's API is gone?): finishing without it")
        self.finish_and_exit()

    def finish_and_exit(self) -> None:
        """Run `finish` once (whoever comes first: the command, the watchdog, a second Ctrl-C) and exit 130."""
        with self._lock:  # a second caller waits here until the first one ends the process
            try:
                self._finish()
            except BaseException as err:  # noqa: BLE001 - the exit status must still be 130
                self._say(f"shutdown: {type(err).__name__}: {err}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                # os._exit: no atexit handlers, which would call Prefect's dead API again (and retry)
                os._exit(EXIT_STATUS)


def finish_run(store_root: str, run_id: str, say: Callable[[str], None], resume: str | None = None) -> None:
    """What an interrupted run must still do, from its run store alone: keep the records (parquet
    from the fsync'd journal), stop the endpoints it started and write teardown.json."""
    from guided_ab import phases
    from guided_ab.errors import UserError
    from guided_ab.store import RunStore

    try:
        rs = RunStore.open(store_root, run_id)
    except UserError:
        say("interrupted before the run had a store: nothing was started")
        return
    kept = 0
    for phase in ("observe", "ab"):
        if rs.has_journal(phase):
            rs.finalize_records(phase)
            kept += len(rs.journal(phase))
    phases.teardown(rs, log=say)
    say(f"interrupted: {kept} records kept, endpoints stopped (teardown.json); "
        + (f"`{resume}`" if resume else f"`guided-ab ab --run-id {run_id} --store {store_root}` (or `observe`)")
        + " resumes the requests, without duplicates, once the arms answer again")
