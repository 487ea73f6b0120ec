"""The whole experiment: deploy -> observe -> A/B -> teardown -> evaluate -> decide.

Teardown runs in `finally` (completed, failed, or cancelled while the process lives) and again
from the on_crashed / on_cancellation hooks; the `teardown-crashed` deployment (triggered by an
automation when an experiment flow run crashes) and the hourly reaper stop whatever a SIGKILL'd
run left behind.

Retrying a failed or crashed flow run (the UI's "Retry", or the API) resumes the same run: the
run id comes from the flow run (flows/_common.py), and guided_ab/resume.py restarts only what
is gone; a new flow run is a new experiment. Experiments with local arms hold this machine's
cores through a Prefect global concurrency limit (flows/_concurrency.py) from deploy to
teardown. Every phase has a time limit derived from the config (guided_ab/limits.py).
"""

from __future__ import annotations

from typing import ParamSpec, TypeVar

from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from guided_ab import phases, resume
from guided_ab.config import load_config
from guided_ab.limits import limits
from guided_ab.store import RunStore
from tasks.endpoints import teardown

from ._common import (
    flow_run_run_id,
    key_envs,
    keys_from_secret_blocks,
    name_flow_run,
    run_index_path,
    store_root,
    teardown_on_crash,
)
from ._concurrency import local_cores_slot
from .ab import ab
from .decide_teardown import decide_teardown
from .deploy import deploy
from .evaluate import evaluate
from .observe import observe

P = ParamSpec("P")
R = TypeVar("R")


def _phase(phase_flow: Flow[P, R], timeout_s: float) -> Flow[P, R]:
    """A phase as a subflow with its time limit. Its result is never persisted: when a failed or
    crashed experiment flow run is retried, Prefect reuses a finished subflow run that has a
    persisted result instead of running it again, and a skipped deploy would leave the resumed
    run without arms."""
    return phase_flow.with_options(timeout_seconds=timeout_s, persist_result=False)


@flow(name="experiment", log_prints=True, on_crashed=[teardown_on_crash], on_cancellation=[teardown_on_crash])
def experiment(config_path: str = "configs/local.yaml", run_id: str | None = None) -> dict:
    """Run every phase of the experiment in `config_path`; returns run id, decision and store path.
    A retry of this flow run resumes its run; `run_id` resumes (or names) a run explicitly."""
    log = get_run_logger()
    cfg = load_config(config_path)
    phases.workload_items(cfg)  # refuse a bad workload before anything starts
    cfg = cfg.model_copy(update={"store": store_root(cfg.store)})
    rs = RunStore.create(cfg, run_id or flow_run_run_id(cfg.name))
    resumed = resume.started(rs)
    if resumed:  # the pre-registration of the first attempt wins over today's config file
        cfg = rs.load_config()
        log.info(f"run {rs.run_id}: resuming (plans, records and arms still up are kept)")
    if current_flow_run.id:
        run_index_path(current_flow_run.id).write_text(f"{cfg.store}\n{rs.run_id}\n")
        name_flow_run(rs.run_id)
    log.info(f"run {rs.run_id}: store {rs.location}")
    keys_from_secret_blocks(key_envs(cfg))
    lim = limits(cfg)
    phases.build_plans(cfg, rs)
    if resumed and resume.sending_done(rs):
        log.info(f"run {rs.run_id}: every planned request has its record; deciding")
        teardown(rs)
    else:
        with local_cores_slot(cfg, log.info):
            try:
                if resumed:
                    resume.reopen(rs, log.info)
                _phase(deploy, lim.deploy_s)(rs.run_id, cfg.store)
                if "observe" in cfg.phases and cfg.workload.observe_size:
                    _phase(observe, lim.observe_s)(rs.run_id, cfg.store)
                if "ab" in cfg.phases:
                    _phase(ab, lim.ab_s)(rs.run_id, cfg.store)
            finally:
                teardown(rs)  # right after the last request: GPUs stop billing before the statistics
    _phase(evaluate, lim.evaluate_s)(rs.run_id, cfg.store, decide=False)
    decide_s = lim.teardown_s + lim.evaluate_s + lim.approval_s
    decision = _phase(decide_teardown, decide_s)(rs.run_id, cfg.store)
    return {"run_id": rs.run_id, "decision": decision["verdict"], "store": rs.location}
