"""What every flow shares: where run stores live on a worker, keys from Prefect Secret blocks,
opening a run from its id, the run id of an experiment flow run, and the crash hook that tears
a flow run's run down.

On a worker, a flow run starts in a fresh clone of the repository in a temporary directory
(prefect.yaml's pull steps), which is deleted when the run ends; a relative store root
(`store: runs` in a config, or the flows' default) would go with it. So a relative store root
resolves against $GUIDED_AB_DATA when that is set (the work pool's or worker's environment), and
against the working directory otherwise (`guided-ab run` in a checkout).

Keys: the code reads API keys from environment variables (Endpoint.key_ref "env:NAME"). On a
worker, set them in the work pool's `job_variables.env` or the worker's environment, or keep
them in Prefect Secret blocks named after the variable (GUIDED_AB_MODAL_API_KEY ->
`guided-ab-modal-api-key`): a variable that is unset is filled from its block, if there is one.
Keys never travel as flow parameters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

from guided_ab import phases
from guided_ab.arms import cores
from guided_ab.arms.modal import API_KEY_ENV as MODAL_API_KEY_ENV
from guided_ab.config import ExperimentConfig
from guided_ab.store import RunStore

DEFAULT_STORE = "runs"
DATA_ENV = "GUIDED_AB_DATA"
MODAL_TOKEN_ENVS = ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")


def store_root(store: str) -> str:
    """The run store root a flow uses: relative roots resolve against $GUIDED_AB_DATA when set."""
    base = os.environ.get(DATA_ENV)
    if "://" in store:  # a URL (s3://..., file:///...): already absolute, never joined to a directory
        return store
    if base and not Path(store).is_absolute():
        return str(Path(base) / store)
    return store


def key_envs(cfg: ExperimentConfig) -> list[str]:
    """The environment variables this run's arms read keys from."""
    names: list[str] = []
    for arm in cfg.arms:
        if arm.target == "modal":
            names += [MODAL_API_KEY_ENV, *MODAL_TOKEN_ENVS]
        if arm.api_key_env:
            names.append(arm.api_key_env)
    return list(dict.fromkeys(names))


def secret_block_name(env: str) -> str:
    return env.lower().replace("_", "-")


def keys_from_secret_blocks(names: Iterable[str]) -> list[str]:
    """Fill each unset variable from the Prefect Secret block named after it; the names filled."""
    filled = []
    for name in names:
        if os.environ.get(name):
            continue
        from prefect.blocks.system import Secret

        try:
            block: Any = Secret.load(secret_block_name(name))  # a sync flow gets the block, not a coroutine
            value = block.get()
        except ValueError:  # no such block
            continue
        if value:
            os.environ[name] = str(value)
            filled.append(name)
    return filled


def open_run(run_id: str, store: str = DEFAULT_STORE) -> tuple[RunStore, ExperimentConfig]:
    """The run's store and its pre-registered config snapshot (and the keys its arms need)."""
    rs = RunStore.open(store_root(store), run_id)
    cfg = rs.load_config()
    keys_from_secret_blocks(key_envs(cfg))
    return rs, cfg


def flow_run_run_id(experiment: str) -> str | None:
    """The run id of the current experiment flow run: the same on every retry of this flow run
    (so a retry resumes the same run), a new one for a new flow run. None outside a flow run.

    `<experiment>-<created, local time>-<last 6 hex digits of the flow run id>` (the random end:
    Prefect's ids may start with a timestamp)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        created = client.read_flow_run(UUID(flow_run.id)).created
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(created.timestamp() if created else time.time()))
    return f"{experiment}-{stamp}-{UUID(flow_run.id).hex[-6:]}"


def name_flow_run(name: str) -> None:
    """Show the run id as the flow run's name in the UI (the reaper also reads it there)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(flow_run.id), name=name)


def run_index_path(flow_run_id: str) -> Path:
    """flow run id -> "<store root>\\n<run id>": how a crash hook or the crash automation, on this
    machine, finds the run of an experiment flow run."""
    from guided_ab.arms.base import state_dir

    d = state_dir() / "flow-runs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{flow_run_id}.txt"


def teardown_on_crash(flow, flow_run, state) -> None:
    """Prefect on_crashed / on_cancellation hook of a flow that writes its run index entry
    (experiment, sweep): stop the arms its run started and free their cores, if the process still
    can. The flow's own `finally: teardown(...)` may not have run (a crash, a cancellation that
    stops the process); when it did, stopping again is harmless (phases.teardown is idempotent).
    A SIGKILL'd process runs no hook at all: the teardown-crashed automation and the hourly reaper
    cover that. Before the flow has written its entry it has started nothing: nothing to do."""
    p = run_index_path(str(flow_run.id))
    if p.is_file():
        root, run_id = p.read_text().split("\n")[:2]
        phases.teardown(RunStore.open(root, run_id), log=print)
        cores.release(run_id)
