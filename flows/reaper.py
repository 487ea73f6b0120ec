"""Reaper: stop endpoints that crashed runs left behind (scheduled hourly in prefect.yaml)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from guided_ab.arms.reaper import reap_everything


@flow(name="reaper", log_prints=True)
def reaper(older_than_s: float = 3600.0, modal_prefix: str | None = None) -> list[str]:
    """Stop local vLLM servers (and Modal apps named `modal_prefix*`) older than `older_than_s`."""
    log = get_run_logger()
    stopped = reap_everything(older_than_s=older_than_s, modal_prefix=modal_prefix, log=log.info)
    create_markdown_artifact(
        "# Reaper\n\n" + ("\n".join(f"- {s}" for s in stopped) if stopped else "Nothing left running."),
        key="guided-ab-reaper", description=f"{len(stopped)} endpoint(s) stopped",
    )
    return stopped
