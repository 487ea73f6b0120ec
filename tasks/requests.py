"""The task that sends a phase's requests, with a progress artifact updated while they run
(and a progress bar on the terminal when the flow runs in one, e.g. `guided-ab run`)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections import Counter
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from guided_ab import phases
from guided_ab.config import ExperimentConfig
from guided_ab.load import progress as console_progress
from guided_ab.load.runner import PhaseResult
from guided_ab.store import RunStore

from .retry import retry_if_transient

UPDATE_EVERY_S = 2.0  # artifacts cost ~40 ms each: update on a clock, not per request


def _describe(done: int, total: int, outcomes: Counter) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    return f"{done}/{total} requests recorded" + (f" ({parts})" if parts else "")


@task(name="send-requests", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def send_requests(cfg: ExperimentConfig, store: RunStore, phase: str) -> dict:
    """Send the rest of the phase's plan (a re-run resumes: recorded requests are not re-sent)."""
    log = get_run_logger()
    state: dict[str, Any] = {"done": 0, "total": 0, "outcomes": Counter()}

    def progress(done: int, total: int, outcomes: Counter) -> None:  # called from the requests' thread
        state.update(done=done, total=total, outcomes=Counter(outcomes))
        bar.update(done, total, outcomes)  # the terminal's bar, opened below before the requests start

    # a sync task gets the artifact's id (the type says "or a coroutine": prefect's sync/async API)
    art = cast(UUID, create_progress_artifact(0.0, key=f"{cfg.name}-{phase}-progress", description=f"{phase}: starting"))
    last_logged = -1
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with console_progress.bar(f"{phase}: requests", total=0) as bar:
        fut = pool.submit(phases.run_requests, cfg, store, phase, progress, stop)
        while True:
            try:
                result: PhaseResult = fut.result(timeout=UPDATE_EVERY_S)
                break
            except concurrent.futures.TimeoutError:
                pass
            except BaseException:  # Ctrl-C / cancellation: stop the requests now, keep what is recorded
                stop.set()
                concurrent.futures.wait([fut], timeout=30)
                pool.shutdown(wait=False)
                raise
            finally:
                total = state["total"] or 1
                text = _describe(state["done"], state["total"], state["outcomes"])
                update_progress_artifact(art, 100.0 * state["done"] / total, description=f"{phase}: {text}")
                tenth = int(10 * state["done"] / total)
                if tenth != last_logged:
                    last_logged = tenth
                    log.info(f"{phase}: {text}")
    pool.shutdown(wait=False)
    summary = {
        "phase": phase, "planned": result.planned, "recorded": result.recorded,
        "sent_now": result.sent_now, "outcomes": dict(result.outcomes),
    }
    log.info(f"{phase} done: {summary}")
    return summary
