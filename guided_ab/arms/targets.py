"""Targets: where an arm is served. `start_arm` / `wait_arm` / `stop_endpoint` dispatch on arm.target."""

from __future__ import annotations

import time

from guided_ab.arms.base import Endpoint
from guided_ab.config import Arm
from guided_ab.store import RunStore


def prepare_arm(arm: Arm, log=print) -> None:
    """What must exist before the arm can start: for a local arm on the embedded model, the
    converted checkpoint (once per cache directory; about a minute on 2 cores)."""
    if arm.target == "local":
        from guided_ab.arms import local

        local.model_path(arm, local.vllm_python(), log=log)


def start_arm(arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
    """Start (or, for external arms, look up) the arm's endpoint. Returns without waiting.
    `cores` pins a local CPU server's compute threads (see phases.start_endpoints)."""
    if arm.target == "local":
        from guided_ab.arms import local

        python = local.vllm_python()
        version = local.vllm_version(python)
        return local.start(arm, store, python=python, model=local.model_path(arm, python), version=version, cores=cores)
    if arm.target == "modal":
        from guided_ab.arms import modal as modal_target

        return modal_target.deploy(arm, store)
    return Endpoint(
        run_id=store.run_id, arm=arm.name, target="external", base_url=arm.url.rstrip("/").removesuffix("/v1"),
        model=arm.model, backend=arm.backend, key_ref=f"env:{arm.api_key_env}" if arm.api_key_env else None,
        cost_per_hour=arm.cost_per_hour,
    )


def wait_arm(ep: Endpoint, deadline_s: float) -> float:
    """Wait until the endpoint answers; seconds waited."""
    if ep.target == "local":
        from guided_ab.arms import local

        return local.wait_ready(ep, deadline_s)
    if ep.target == "modal":
        from guided_ab.arms import modal as modal_target

        return modal_target.wait_ready(ep, deadline_s)
    from guided_ab.arms.external import wait_ready

    return wait_ready(ep, deadline_s)


def stop_endpoint(ep: Endpoint) -> dict:
    """Stop what this run started (external endpoints are never stopped). Returns a teardown entry."""
    stopped = False
    if ep.target == "local":
        from guided_ab.arms import local

        stopped = local.stop(ep)
    elif ep.target == "modal":
        from guided_ab.arms import modal as modal_target

        stopped = modal_target.stop(ep)
    now = time.time()
    held_s = (now - ep.started_at) if ep.started_at else 0.0
    return {
        "arm": ep.arm, "target": ep.target, "stopped": stopped, "stopped_at": now,
        "held_s": held_s, "cost_usd": held_s / 3600 * ep.cost_per_hour,
    }
