"""The whole experiment: deploy -> observe -> A/B -> teardown -> evaluate -> decide.

Teardown runs in `finally` (completed, failed, or cancelled while the process lives) and again
from the on_crashed / on_cancellation hooks; `guided-ab reap` (and the hourly reaper deployment)
stops whatever a SIGKILL'd run left behind.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from guided_ab import phases
from guided_ab.arms.base import state_dir
from guided_ab.config import load_config
from guided_ab.store import RunStore
from tasks.endpoints import teardown

from .ab import ab
from .decide_teardown import decide_teardown
from .deploy import deploy
from .evaluate import evaluate
from .observe import observe


def _run_index(flow_run_id: str) -> Path:
    d = state_dir() / "flow-runs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{flow_run_id}.txt"


def _teardown_hook(flow, flow_run, state) -> None:
    """on_crashed / on_cancellation: stop what the run started, if the process still can."""
    p = _run_index(str(flow_run.id))
    if p.is_file():
        root, run_id = p.read_text().split("\n")[:2]
        phases.teardown(RunStore.open(root, run_id), log=print)


@flow(name="experiment", log_prints=True, on_crashed=[_teardown_hook], on_cancellation=[_teardown_hook])
def experiment(config_path: str = "configs/local.yaml", run_id: str | None = None) -> dict:
    """Run every phase of the experiment in `config_path`; returns run id, decision and store path."""
    log = get_run_logger()
    cfg = load_config(config_path)
    phases.workload_items(cfg)  # refuse a bad workload before anything starts
    rs = RunStore.create(cfg, run_id)
    if current_flow_run.id:
        _run_index(current_flow_run.id).write_text(f"{cfg.store}\n{rs.run_id}\n")
    log.info(f"run {rs.run_id}: store {rs.dir}")
    phases.build_plans(cfg, rs)
    try:
        deploy(rs.run_id, cfg.store)
        if "observe" in cfg.phases and cfg.workload.observe_size:
            observe(rs.run_id, cfg.store)
        if "ab" in cfg.phases:
            ab(rs.run_id, cfg.store)
    finally:
        teardown(rs)  # right after the last request: GPUs stop billing before the statistics
    evaluate(rs.run_id, cfg.store, decide=False)
    decision = decide_teardown(rs.run_id, cfg.store)
    return {"run_id": rs.run_id, "decision": decision["verdict"], "store": str(rs.dir)}
