"""Tasks that start, wait for and stop the arms' endpoints."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.tasks import exponential_backoff

from guided_ab import phases
from guided_ab.config import ExperimentConfig
from guided_ab.load import progress as console_progress
from guided_ab.store import RunStore

from .retry import retry_if_transient


@task(name="start-endpoints")
def start_endpoints(cfg: ExperimentConfig, store: RunStore) -> list[str]:
    log = get_run_logger()
    with console_progress.bar(f"deploy: starting {len(cfg.arms)} arm(s)", total=None):
        endpoints = phases.start_endpoints(cfg, store, log=log.info)
    return list(endpoints)


# An arm still cold-starting (or refusing connections) at its deadline raises ArmNotReady, which is
# transient: the task waits again, for every arm. A refused key or a dead local server is not retried.
@task(
    name="wait-endpoints", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient,
)
def wait_endpoints(cfg: ExperimentConfig, store: RunStore) -> dict[str, float]:
    log = get_run_logger()
    endpoints = phases.load_endpoints(store)
    with console_progress.bar("deploy: waiting for the servers to answer", total=len(endpoints)) as bar:

        def ready(message: str) -> None:  # wait_endpoints logs once per arm, when it is ready
            log.info(message)
            bar.advance()

        waited = phases.wait_endpoints(cfg, store, endpoints, log=ready)
    for name, ep in endpoints.items():
        create_link_artifact(
            key=f"{cfg.name}-endpoint-{name}"[:100], link=ep.base_url + "/v1/models",
            link_text=f"{name}: {ep.target} endpoint ({ep.backend})",
            description=f"Arm '{name}' of run {store.run_id}; needs the run's API key.",
        )
    return waited


@task(name="teardown", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_if_transient)
def teardown(store: RunStore) -> list[dict]:
    log = get_run_logger()
    return phases.teardown(store, log=log.info)
