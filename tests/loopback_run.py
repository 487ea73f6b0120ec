"""A run store and external endpoints pointing at the loopback server (conftest's `loopback`), for
tests that drive guided_ab.load.runner.run_plan without vLLM."""

from __future__ import annotations

from pathlib import Path

from guided_ab.arms.base import Endpoint
from guided_ab.store import RunStore


def loopback_run(url: str, root: Path, run_id: str, arms=("a", "b")) -> tuple[RunStore, dict[str, Endpoint]]:
    """(a run store with its records folder, arm -> an external endpoint at `url`)."""
    store = RunStore(root, run_id)
    store.path("records").mkdir(parents=True, exist_ok=True)
    endpoints = {a: Endpoint(run_id=run_id, arm=a, target="external", base_url=url, model="loopback", backend="x")
                 for a in arms}
    return store, endpoints
