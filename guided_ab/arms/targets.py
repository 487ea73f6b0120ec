"""The table of targets: which module serves each TargetKind, and the calls the phases make on an arm.

`target_for(kind)` is the only place that maps a target's name to its implementation (a
`base.Target`); everything else asks the target. Modules are imported on first use, so
importing this (e.g. for a dry run or the canary) loads neither the local server code nor the
Modal target. `prepare_arm` / `start_arm` / `wait_arm` / `stop_endpoint` are the phases' calls.
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from guided_ab.arms.base import Endpoint, Log, Target
from guided_ab.config import Arm, ConfigError, TargetKind
from guided_ab.errors import RunStateError

if TYPE_CHECKING:
    from guided_ab.store import RunStore

# TargetKind -> the module whose TARGET implements it
TARGET_MODULES: dict[str, str] = {
    "local": "guided_ab.arms.local",
    "modal": "guided_ab.arms.modal",
    "external": "guided_ab.arms.external",
}


@functools.cache
def target_for(kind: TargetKind | str) -> Target:
    """The implementation of a target kind."""
    module = TARGET_MODULES.get(kind)
    if module is None:
        raise ConfigError(f"unknown target {kind!r}; targets are {sorted(TARGET_MODULES)}")
    target: Target = importlib.import_module(module).TARGET
    return target


def prepare_arm(arm: Arm, log: Log = print) -> None:
    """What must exist before the arm can start: for a local arm on the embedded model, the
    converted checkpoint (once per cache directory; about a minute on 2 cores)."""
    target_for(arm.target).prepare(arm, log)


def start_arm(arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
    """Start (or, for external arms, look up) the arm's endpoint. Returns without waiting.
    `cores` pins a local CPU server's compute threads (see phases.start_endpoints). A server on
    this machine is stamped with the machine's name (`check_on_this_machine`)."""
    target = target_for(arm.target)
    ep = target.start(arm, store, cores=cores)
    if target.shares_local_cores and ep.host is None:
        ep = ep.model_copy(update={"host": this_machine()})
    return ep


def this_machine() -> str:
    """This machine's name as a run records it: GUIDED_AB_MACHINE (set it where host names are not
    stable, e.g. in containers), else the short host name (the rule of flows/_concurrency.py)."""
    return os.environ.get("GUIDED_AB_MACHINE") or socket.gethostname().split(".")[0]


def check_on_this_machine(store: RunStore, endpoints: Mapping[str, Endpoint]) -> None:
    """Refuse (RunStateError: the CLI exits 2, nothing is touched) a phase that would use or stop
    local arms another machine started.

    A local server is a process of the machine that started it: its URL is that machine's
    loopback, its key file is in that machine's state directory, and only there can it be
    stopped. Phases on Prefect workers may run anywhere; these arms cannot follow them. Arms a
    teardown has already stopped hold nothing any more, so evaluate, decide and `continue` (which
    starts them again, here) work on any machine.
    """
    here = this_machine()
    elsewhere = {name: ep.host for name, ep in endpoints.items() if ep.host and ep.host != here}
    if not elsewhere:
        return
    stopped = {e.get("arm") for e in store.read_json("teardown.json", default={}).get("arms", [])}
    live = {name: host for name, host in elsewhere.items() if name not in stopped}
    if not live:
        return
    host = sorted(set(live.values()))[0]
    raise RunStateError(
        f"this run's arms are local to host {host}: run this phase there, or use modal/external arms "
        f"(run {store.run_id}: arms {sorted(live)} run on {', '.join(sorted(set(live.values())))}; this is {here}, "
        "named by GUIDED_AB_MACHINE or the host name; nothing was changed)"
    )


def wait_arm(ep: Endpoint, deadline_s: float) -> float:
    """Wait until the endpoint answers; seconds waited."""
    return target_for(ep.target).wait(ep, deadline_s)


def stop_endpoint(ep: Endpoint) -> dict:
    """Stop what this run started (external endpoints are never stopped). Returns a teardown entry."""
    stopped = target_for(ep.target).stop(ep)
    now = time.time()
    held_s = (now - ep.started_at) if ep.started_at else 0.0
    return {
        "arm": ep.arm, "target": ep.target, "stopped": stopped, "stopped_at": now,
        "held_s": held_s, "cost_usd": held_s / 3600 * ep.cost_per_hour,
    }
