"""Stop the arms of an experiment whose flow run crashed, right away (not at the hourly reaper).

The `teardown-crashed` deployment (prefect.yaml) is triggered by an automation on the event
`prefect.flow-run.Crashed` of the `experiment` flow, with the crashed flow run's id. A crashed
process runs no `finally`; the on_crashed hook runs only if the worker that ran it is still up
and can load the flow; this covers the rest, on a worker of the same pool.

The run is found by the index the experiment flow writes on its machine (state directory), else
by the flow run's name (its run id) under the store root. Nothing is torn down if the flow run
is no longer crashed (retried meanwhile: its resumed run owns the arms now).
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client

from guided_ab import phases
from guided_ab.arms import cores
from guided_ab.errors import UserError
from guided_ab.store import RunStore

from ._common import DEFAULT_STORE, run_index_path, store_root


@flow(name="teardown-crashed", log_prints=True)
def teardown_crashed(flow_run_id: str, store: str = DEFAULT_STORE) -> list[dict]:
    """Tear down the run of the crashed experiment flow run `flow_run_id` (a bare id, or the
    event's resource id `prefect.flow-run.<id>`)."""
    log = get_run_logger()
    flow_run_id = flow_run_id.removeprefix("prefect.flow-run.")
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(UUID(flow_run_id))
    if not (fr.state and fr.state.is_crashed()):
        log.info(f"flow run {flow_run_id} is {fr.state.name if fr.state else 'without a state'} now: nothing to tear down")
        return []
    index = run_index_path(flow_run_id)
    if index.is_file():
        root, run_id = index.read_text().split("\n")[:2]
    else:
        root, run_id = store_root(store), str((fr.parameters or {}).get("run_id") or fr.name)
    try:
        rs = RunStore.open(root, run_id)
    except UserError as err:
        log.warning(f"flow run {flow_run_id}: its run is not found here ({err}); the hourly reaper stops what it left")
        return []
    entries = phases.teardown(rs, log=log.info)
    cores.release(rs.run_id)
    create_markdown_artifact(
        f"# Teardown of crashed run `{rs.run_id}`\n\n"
        + "\n".join(f"- {e['arm']}: {'stopped' if e.get('stopped') else 'already stopped'}" for e in entries),
        key="guided-ab-teardown-crashed", description=f"run {rs.run_id}: {len(entries)} arm(s)",
    )
    return entries
