"""The table of targets: which module serves each TargetKind, and the calls the phases make on an arm.

`target_for(kind)` is the only place that maps a target's name to its implementation (a
`base.Target`); everything else asks the target. Modules are imported on first use, so
importing this (e.g. for a dry run or the canary) loads neither the local server code nor the
Modal target. `prepare_arm` / `start_arm` / `wait_arm` / `stop_endpoint` are the phases' calls.
"""

from __future__ import annotations

import functools
import importlib
import time
from typing import TYPE_CHECKING

from guided_ab.arms.base import Endpoint, Log, Target
from guided_ab.config import Arm, ConfigError, TargetKind

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
    `cores` pins a local CPU server's compute threads (see phases.start_endpoints)."""
    return target_for(arm.target).start(arm, store, cores=cores)


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
