"""The rate sweep: deploy -> sweep (per arm: saturation, then a ladder of open-loop rates) -> teardown.

The arms are stopped in `finally` right after the last request (completed, failed or cancelled
while the process lives) and again from the on_crashed / on_cancellation hooks; the hourly reaper
stops whatever a SIGKILL'd run left. Local arms hold this machine's cores (flows/_concurrency.py)
from deploy to teardown, as an experiment does. `run_id` resumes a sweep: complete steps are
kept, the rest is sent (guided_ab/sweep.py). The results are published as artifacts: the knees
and a table per arm (markdown), and links to sweep-report.html and sweep.json.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from guided_ab import phases
from guided_ab import sweep as S
from guided_ab.config import ExperimentConfig, load_config
from guided_ab.limits import limits
from guided_ab.reports.sweep_report import markdown
from guided_ab.store import RunStore, new_run_id
from tasks.endpoints import teardown

from ._common import key_envs, keys_from_secret_blocks, run_index_path, store_root, teardown_on_crash
from ._concurrency import local_cores_slot
from .deploy import deploy


@task(name="sweep-arms", cache_policy=NO_CACHE)
def sweep_arms(cfg: ExperimentConfig, store: RunStore) -> dict:
    """Saturation and the ladder, arm after arm (a re-run resumes: recorded requests are not re-sent)."""
    return S.run_sweep(cfg, store, log=get_run_logger().info)


@task(name="publish-sweep", cache_policy=NO_CACHE, timeout_seconds=5 * 60)
def publish_sweep(cfg: ExperimentConfig, store: RunStore, result: dict) -> list[str]:
    key = f"{cfg.name}-sweep"[:90]
    desc = f"rate sweep, run {store.run_id}"
    ids = [create_markdown_artifact(markdown(result), key=key, description=desc)]
    for name in ("sweep-report.html", "sweep.json"):
        p = store.path(name)
        if p.is_file():
            ids.append(create_link_artifact(p.as_uri(), link_text=f"{name} ({store.run_id})",
                                            key=f"{key}-{name.replace('.', '-')}",
                                            description=f"{desc}: open it on the machine holding the run store"))
    return [str(i) for i in ids]


@flow(name="sweep", log_prints=True, on_crashed=[teardown_on_crash], on_cancellation=[teardown_on_crash])
def sweep(config_path: str = "configs/local.yaml", run_id: str | None = None) -> dict:
    """Deploy the config's arms, sweep each (saturation, then the ladder of rates), stop them;
    returns run id, the knee per arm and where the report is."""
    from prefect.runtime import flow_run as current_flow_run

    log = get_run_logger()
    cfg = load_config(config_path)
    phases.workload_items(cfg)  # a bad workload is refused before anything starts
    cfg = cfg.model_copy(update={"store": store_root(cfg.store)})
    rs = RunStore.create(cfg, run_id or new_run_id(f"{cfg.name}-sweep"[:60]))
    cfg = rs.load_config()  # the snapshot: a resumed sweep keeps its first config (the pre-registration)
    if current_flow_run.id:
        run_index_path(current_flow_run.id).write_text(f"{cfg.store}\n{rs.run_id}\n")
    log.info(f"sweep {rs.run_id}: store {rs.dir}")
    keys_from_secret_blocks(key_envs(cfg))
    with local_cores_slot(cfg, log.info):
        try:
            deploy.with_options(timeout_seconds=limits(cfg).deploy_s, persist_result=False)(rs.run_id, cfg.store)
            result = sweep_arms(cfg, rs)
        finally:
            teardown(rs)  # right after the last request
    publish_sweep(cfg, rs, result)
    knees = {arm: a["knee"]["rate"] for arm, a in result["arms"].items()}
    return {"run_id": rs.run_id, "knees": knees, "store": str(rs.dir), "report": str(S.report_path(rs))}
