"""Reaper: stop endpoints that crashed runs left behind (scheduled hourly in prefect.yaml).

Local vLLM servers whose experiment process is gone, and (with `modal_prefix`, which the
`reaper` deployment sets to this project's app prefix, `gab-`) Modal apps of this project older
than `older_than_s`. Never what a run still in progress holds: the run ids of every flow run
that is running, pending, paused or cancelling (their `run_id` parameter, and the experiment
flow runs' names, which are their run ids) are protected, whatever their age. Without a Modal
token on the worker the Modal part is skipped and the artifact says so.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run as current_flow_run

from guided_ab.arms import modal as modal_target
from guided_ab.arms.reaper import reap_everything
from guided_ab.arms.targets import target_for

from ._common import keys_from_secret_blocks

IN_PROGRESS = [StateType.RUNNING, StateType.PENDING, StateType.PAUSED, StateType.CANCELLING]


def runs_in_progress() -> set[str]:
    """Run ids (and names) of the flow runs that are not finished, this reaper's own excepted."""
    protect: set[str] = set()
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_PROGRESS)))
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.read_flow_runs(flow_run_filter=flt, limit=200, offset=offset)
            for fr in page:
                if str(fr.id) == current_flow_run.id:
                    continue
                protect.add(fr.name)
                if (fr.parameters or {}).get("run_id"):
                    protect.add(str(fr.parameters["run_id"]))
            if len(page) < 200:
                return protect
            offset += 200


@flow(name="reaper", log_prints=True)
def reaper(older_than_s: float = 3600.0, modal_prefix: str | None = None) -> list[str]:
    """Stop local vLLM servers (and Modal apps named `modal_prefix*`) older than `older_than_s`,
    except those of runs in progress."""
    log = get_run_logger()
    protect = runs_in_progress()
    stopped = reap_everything(older_than_s=older_than_s, protect=protect, log=log.info)  # local servers
    notes = []
    if modal_prefix:
        keys_from_secret_blocks(("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"))
        if modal_target.sdk().has_credentials():
            for line in target_for("modal").reap(older_than_s=older_than_s, prefix=modal_prefix, protect=protect):
                log.info(line)
                stopped.append(line)
        else:
            notes.append(f"Modal apps `{modal_prefix}*` were not checked: no Modal token on this worker "
                         "(MODAL_TOKEN_ID/MODAL_TOKEN_SECRET, or Secret blocks modal-token-id / modal-token-secret)")
            log.warning(notes[-1])
    body = "\n".join(f"- {s}" for s in stopped) if stopped else "Nothing left running."
    create_markdown_artifact(
        "# Reaper\n\n" + body + "".join(f"\n\n**Note:** {n}" for n in notes)
        + f"\n\n{len(protect)} flow run(s) in progress were protected.",
        key="guided-ab-reaper", description=f"{len(stopped)} endpoint(s) stopped",
    )
    return stopped
