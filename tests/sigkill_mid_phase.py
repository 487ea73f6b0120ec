"""SIGKILL a phase's process once it has recorded some of its requests: how the resume tests
(tests/test_resume_after_kill.py, tests/test_store_s3.py) leave a run as a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def sigkill_once_recorded(cmd: list[str], env: dict[str, str], store: RunStore, phase: str, at_least: int,
                          *, timeout_s: float = 240) -> int:
    """Run `cmd` (a process running `phase` of `store`'s run) in a session of its own, SIGKILL the
    whole session (a Prefect flow's ephemeral API server too) as soon as the phase has `at_least`
    records, or after `timeout_s`; the records it has then. The phase must not end first."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while len(store.journal(phase)) < at_least and time.monotonic() < deadline:
        assert proc.poll() is None, f"the {phase} phase ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return len(store.journal(phase))
