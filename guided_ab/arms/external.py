"""External target: an OpenAI-compatible endpoint someone else runs (e.g. today's production).

Nothing is started or stopped: the arm's endpoint is built from its URL and key variable
(`endpoint`, also used by the production canary), and the deploy phase only waits for it to answer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from guided_ab.arms.base import Endpoint, Log, StartEstimate, Target
from guided_ab.arms.ready import wait_until_ready
from guided_ab.config import Arm, ConfigError, ExperimentConfig, TargetKind

if TYPE_CHECKING:
    from guided_ab.store import RunStore


def endpoint(
    *, run_id: str, arm: str, url: str, model: str, backend: str, api_key_env: str | None = None,
    cost_per_hour: float = 0.0,
) -> Endpoint:
    """The Endpoint of an external server: its base URL (without /v1) and where its key lives."""
    return Endpoint(
        run_id=run_id, arm=arm, target="external", base_url=url.rstrip("/").removesuffix("/v1"), model=model,
        backend=backend, key_ref=f"env:{api_key_env}" if api_key_env else None, cost_per_hour=cost_per_hour,
    )


def wait_ready(ep: Endpoint, deadline_s: float, *, poll_s: float = 2.0) -> float:
    """Wait until GET /v1/models answers 200 (a cold-starting endpoint may answer 503 first)."""
    return wait_until_ready(ep, deadline_s, what=f"endpoint of arm '{ep.arm}' ({ep.base_url})", poll_s=poll_s)


class ExternalTarget:
    """An endpoint that is already running: looked up, waited for, never started or stopped."""

    kind: TargetKind = "external"
    shares_local_cores = False
    stop_again = False
    slow_start = False
    where_label = "where"

    def prepare(self, arm: Arm, log: Log = print) -> None:
        pass  # nothing to prepare: someone else runs it

    def start(self, arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
        if not arm.url:  # the config refuses this already; kept for arms built in code
            raise ConfigError(f"arm '{arm.name}': target 'external' needs 'url'")
        return endpoint(
            run_id=store.run_id, arm=arm.name, url=arm.url, model=arm.model, backend=arm.backend,
            api_key_env=arm.api_key_env, cost_per_hour=arm.cost_per_hour,
        )

    def start_deadline(self, cfg: ExperimentConfig, arm_name: str) -> float:
        return cfg.server_start_timeout_s

    def wait(self, ep: Endpoint, deadline_s: float) -> float:
        return wait_ready(ep, deadline_s)

    def stop(self, ep: Endpoint) -> bool:
        return False  # never ours to stop

    def reap(self, *, run_id: str | None = None, older_than_s: float = 0.0, prefix: str | None = None,
             force: bool = False, protect: Collection[str] = ()) -> list[str]:
        return []

    def estimate(self, arm: Arm, *, experiment: str, run_id: str, startup_s: Mapping[str, float]) -> StartEstimate:
        return StartEstimate(where=arm.url or "-", gpu="-", cost_per_hour=arm.cost_per_hour, startup_s=0.0, max_startup_s=0.0)

    def describe(self, arm: Arm) -> list[str]:
        return []


TARGET: Target = ExternalTarget()
