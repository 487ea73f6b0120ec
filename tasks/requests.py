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
from prefect.cache_policies import NO_CACHE

from guided_ab import phases
from guided_ab.config import ExperimentConfig
from guided_ab.load import progress as console_progress
from guided_ab.load.runner import PhaseResult
from guided_ab.store import RunStore

from .retry import retry_if_transient

UPDATE_EVERY_S = 2.0  # artifacts cost ~40 ms each: update on a clock, not per request
STOP_WAIT_S = 10.0  # after Ctrl-C: the requests in flight get this long to stop (shutdown.GRACE_S is longer)


def _describe(done: int, total: int, outcomes: Counter) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    return f"{done}/{total} requests recorded" + (f" ({parts})" if parts else "")


class _Reporter:
    """The progress artifact and log lines. Progress is never worth failing (or retrying) the
    requests for: an update that fails (Prefect's API gone, e.g. killed by the same Ctrl-C)
    is dropped, and so are the later ones."""

    def __init__(self, cfg: ExperimentConfig, phase: str, state: dict[str, Any]):
        self.phase, self.state, self.log = phase, state, get_run_logger()
        self.last_logged = -1
        self.art: UUID | None = None
        try:  # a sync task gets the artifact's id (the type says "or a coroutine": prefect's sync/async API)
            self.art = cast(UUID, create_progress_artifact(0.0, key=f"{cfg.name}-{phase}-progress", description=f"{phase}: starting"))
        except Exception as err:  # noqa: BLE001 - see the class doc
            self.log.warning(f"{phase}: no progress artifact ({type(err).__name__}: {err})")

    def update(self) -> None:
        st = self.state
        total = st["total"] or 1
        text = _describe(st["done"], st["total"], st["outcomes"])
        if self.art is not None:
            try:
                update_progress_artifact(self.art, 100.0 * st["done"] / total, description=f"{self.phase}: {text}")
            except Exception as err:  # noqa: BLE001 - see the class doc
                self.art = None
                self.log.warning(f"{self.phase}: progress artifact updates stopped ({type(err).__name__}: {err})")
        tenth = int(10 * st["done"] / total)
        if tenth != self.last_logged:
            self.last_logged = tenth
            self.log.info(f"{self.phase}: {text}")


@task(name="send-requests", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def send_requests(cfg: ExperimentConfig, store: RunStore, phase: str) -> dict:
    """Send the rest of the phase's plan (a re-run resumes: recorded requests are not re-sent)."""
    log = get_run_logger()
    state: dict[str, Any] = {"done": 0, "total": 0, "outcomes": Counter()}

    def progress(done: int, total: int, outcomes: Counter) -> None:  # called from the requests' thread
        state.update(done=done, total=total, outcomes=Counter(outcomes))
        bar.update(done, total, outcomes)  # the terminal's bar, opened below before the requests start

    reporter = _Reporter(cfg, phase, state)
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with console_progress.bar(f"{phase}: requests", total=0) as bar:
        fut = pool.submit(phases.run_requests, cfg, store, phase, progress, stop)
        while True:
            try:
                result: PhaseResult = fut.result(timeout=UPDATE_EVERY_S)
                break
            except concurrent.futures.TimeoutError:
                reporter.update()
            except BaseException:  # Ctrl-C / cancellation: stop the requests now, keep what is recorded; no
                stop.set()  # progress update on the way out (the API may be gone with the same Ctrl-C)
                concurrent.futures.wait([fut], timeout=STOP_WAIT_S)
                pool.shutdown(wait=False)
                raise
        reporter.update()
    pool.shutdown(wait=False)
    summary = {
        "phase": phase, "planned": result.planned, "recorded": result.recorded,
        "sent_now": result.sent_now, "outcomes": dict(result.outcomes),
    }
    log.info(f"{phase} done: {summary}")
    return summary
