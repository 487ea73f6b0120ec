"""Which CPU cores a run's local vLLM servers get, accounting for the other runs on this machine.

Two runs whose local servers share a core spoil each other's latency comparison, so each run
claims the cores it pins its servers to, and the next run picks from the cores nobody holds.
A claim is a file in the state directory (`cores/<run_id>.json`: arm -> cores, and the process
that claimed them), written under a file lock. It counts while that process is alive and the
run has not released it (`release`, after its teardown), or while any local server of the run
is still recorded alive (a crashed run's servers hold their cores until the reaper stops them).

Waiting for free cores is not done here: the experiment flow takes a slot of a Prefect global
concurrency limit per machine first (flows/_concurrency.py). Without free cores (e.g. phases
re-run by hand beside a running experiment) the servers share what there is, and say so.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from guided_ab.arms.base import state_dir

Log = Callable[[str], None]


def _claims_dir() -> Path:
    d = state_dir() / "cores"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _locked() -> Iterator[None]:
    with open(_claims_dir() / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _owner_alive(claim: dict) -> bool:
    pid = claim.get("owner_pid")
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _cmdline(pid) == claim.get("owner_cmd")


def _servers_alive(run_id: str) -> bool:
    from guided_ab.arms.local import leftovers  # the local target's records of the servers it started

    return any(rec.get("run_id") == run_id and rec.get("alive") for rec in leftovers())


def live_claims(*, exclude: str | None = None) -> dict[str, dict[str, list[int]]]:
    """run id -> arm -> cores, for every claim that still counts (dead ones are removed)."""
    out = {}
    for p in sorted(_claims_dir().glob("*.json")):
        try:
            claim = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        run_id = claim.get("run_id", p.stem)
        if run_id == exclude:
            continue
        if _owner_alive(claim) or _servers_alive(run_id):
            out[run_id] = claim.get("arms", {})
        else:
            p.unlink(missing_ok=True)
    return out


def bind_spec(cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a set of cores: ranges and single ids, e.g. "0-3,6"."""
    parts: list[str] = []
    run: list[int] = []
    for c in sorted(set(cores)):
        if run and c != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def allocate(run_id: str, arms: list[str], *, n_cores: int | None = None, log: Log = print) -> tuple[dict[str, str], bool]:
    """Cores for the local arms `arms` of a run about to start: (arm -> VLLM_CPU_OMP_THREADS_BIND,
    own_core). own_core: each arm has a core of its own (the two requests of a pair can run at
    once); otherwise the arms share the free cores and start one after the other. Cores held by
    other runs, and by this run's arms still up, are never given out (unless no core is free)."""
    n = n_cores or os.cpu_count() or 1
    path = _claims_dir() / f"{run_id}.json"
    with _locked():
        mine: dict[str, list[int]] = {}
        if path.is_file():
            try:
                mine = {a: c for a, c in json.loads(path.read_text()).get("arms", {}).items() if a not in arms}
            except (OSError, ValueError):
                mine = {}
        others = live_claims(exclude=run_id)
        busy = {c for claim in [*others.values(), mine] for cs in claim.values() for c in cs}
        free = [c for c in range(n) if c not in busy]
        shared = not free
        if shared:
            held_by = sorted(others) or [run_id]
            log(f"every core of this machine is held by run(s) {held_by}: the servers of run {run_id} share them, "
                "and the latency comparisons of both runs suffer (run experiments one after the other)")
            free = list(range(n))
        own_core = not shared and 1 < len(arms) <= len(free)
        given = {a: [free[i]] for i, a in enumerate(arms)} if own_core else {a: list(free) for a in arms}
        claim = {"run_id": run_id, "arms": {**mine, **given}, "owner_pid": os.getpid(),
                 "owner_cmd": _cmdline(os.getpid()), "at": time.time()}
        path.write_text(json.dumps(claim))
    return {a: bind_spec(cs) for a, cs in given.items()}, own_core


def release(run_id: str) -> None:
    """The run's servers are stopped: its cores are free for the next run."""
    with _locked():
        (_claims_dir() / f"{run_id}.json").unlink(missing_ok=True)
