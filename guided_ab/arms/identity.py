"""Is the process a stored pid names still the server this run started? Asked before any signal.

A run's endpoints.json (and the reaper's state records) keep the pid of each local server. Long
after, that pid may name anything: pids are reused. `teardown` on an old run id used to kill
whatever process group the pid named (as root, anything). Now teardown, decide-teardown and reap
all signal a group only when its process proves to be the one started:

- its command line is a vLLM server command (vllm_args.is_server_cmdline) on the recorded port;
- it started when the record says: the kernel's start time of the process, in clock ticks since
  boot, read right after it was started (immune to wall-clock jumps); a record without it
  (written before) is compared by wall clock, within START_SLACK_S;
- its environment holds the run's marker (MARKER_ENV = "<run>/<arm>/<random>"), set only in the
  server's environment at start (a new process cannot have it; its workers inherit it).

When the leader is gone but its group's workers live on, a worker holding the marker proves the
group. A record without a marker (written before markers existed) needs the first two. Linux
/proc only; elsewhere nothing proves anything and nothing is signalled.
"""

from __future__ import annotations

import os
import secrets
from functools import cache
from pathlib import Path

from guided_ab.arms.vllm_args import is_server_cmdline

MARKER_ENV = "GUIDED_AB_SERVER_MARKER"
START_SLACK_S = (30.0, 2.0)  # the process may start this long before / after the recorded start time


def new_marker(run_id: str, arm: str) -> str:
    return f"{run_id}/{arm}/{secrets.token_hex(8)}"


@cache
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (field 3 = state is [0])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of the process: clock ticks since boot (field 22 of its stat)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def started_at(pid: int) -> float | None:
    """When the process started (unix time), from the kernel."""
    ticks, boot = start_ticks(pid), _boot_time()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _has_marker(pid: int, marker: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # not ours to read: not ours to signal
        return False
    return f"{MARKER_ENV}={marker}".encode() in env


def _started_in_time(pid: int, recorded: float | None, ticks: int | None) -> bool:
    if ticks is not None:
        return start_ticks(pid) == ticks
    t = started_at(pid)
    return recorded is not None and t is not None and recorded - START_SLACK_S[0] <= t <= recorded + START_SLACK_S[1]


def _is_leader(pid: int, port: int | None, marker: str | None, recorded: float | None, ticks: int | None) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = cmdline.split(b"\0")
    on_port = port is None or any(a == b"--port" and b == str(port).encode() for a, b in zip(args, args[1:]))
    return (is_server_cmdline(cmdline) and on_port and _started_in_time(pid, recorded, ticks)
            and (marker is None or _has_marker(pid, marker)))


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            fields = _stat(int(d.name))
            if fields and fields[0] != "Z" and fields[2] == str(pgid):  # field 5: process group
                out.append(int(d.name))
    return out


def owns_group(pgid: int, *, port: int | None, marker: str | None, recorded_start: float | None,
               ticks: int | None = None) -> bool:
    """Is process group `pgid` (its leader's pid) the server a record describes? See the module's doc."""
    fields = _stat(pgid)
    if fields and fields[0] != "Z":
        return fields[2] == str(pgid) and _is_leader(pgid, port, marker, recorded_start, ticks)
    if marker is None:
        return False  # the leader is gone and nothing else can prove the group
    # its workers started after it: later start ticks (or, without them, not before the recorded start)
    return any(_has_marker(p, marker) and ((start_ticks(p) or -1) >= ticks if ticks is not None
                                           else (started_at(p) or 0) >= (recorded_start or 0) - START_SLACK_S[0])
               for p in group_members(pgid))
