"""Tasks that start, wait for and stop the arms' endpoints.

They act on the world (servers, Modal apps, bills), so none of them is ever cached
(`cache_policy=NO_CACHE`): with result persistence on, Prefect's default policy would let a
retried flow run skip a teardown or a start because "the same inputs ran before". Their time
limits come from the config (guided_ab/limits.py; the flows pass them with `with_options`)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from guided_ab import phases
from guided_ab.arms import cores
from guided_ab.config import ExperimentConfig
from guided_ab.load import progress as console_progress
from guided_ab.store import RunStore

from .retry import retry_if_transient


@task(name="start-endpoints", cache_policy=NO_CACHE)
def start_endpoints(cfg: ExperimentConfig, store: RunStore) -> list[str]:
    log = get_run_logger()
    with console_progress.bar(f"deploy: starting {len(cfg.arms)} arm(s)", total=None):
        endpoints = phases.start_endpoints(cfg, store, log=log.info)
    return list(endpoints)


# An arm still cold-starting (or refusing connections) at its deadline raises ArmNotReady, which is
# transient: the task waits again, for every arm. A refused key or a dead local server is not retried.
@task(
    name="wait-endpoints", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE,
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


@task(name="teardown", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE, timeout_seconds=15 * 60)
def teardown(store: RunStore) -> list[dict]:
    log = get_run_logger()
    entries = phases.teardown(store, log=log.info)
    cores.release(store.run_id)  # its local servers are stopped: the next run may have their cores
    return entries
