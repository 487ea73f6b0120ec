"""Experiments with local arms never overlap on one machine: they share its cores, so a second
one would spoil the first one's latency comparison (and its own).

Each machine has a Prefect global concurrency limit, `guided-ab-local-<machine>`, whose slots
are its CPU cores. An experiment with local arms holds one slot per local arm (all of them, if
it has more arms than the machine has cores) from before its deploy until its teardown; a
second experiment waits for its slots (its flow run logs that it waits, and for which limit),
and then gets cores nobody holds (guided_ab/arms/cores.py). Experiments without local arms take
no slot. Create the limit once per machine (the flow creates it, with a slot per core, if it is
missing):

    prefect gcl create guided-ab-local-$(hostname -s) --limit $(nproc)    # --limit 2: one 2-arm experiment at a time

`<machine>` is GUIDED_AB_MACHINE if set (e.g. the host's name for workers in containers), else
this host's name. The slots are leased (GUIDED_AB_SLOT_LEASE_S, default 120 s, renewed while
the experiment runs): a SIGKILL'd experiment's slots come back after the lease ends.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from guided_ab.arms.targets import target_for
from guided_ab.config import ExperimentConfig

LIMIT_PREFIX = "guided-ab-local-"


def limit_name() -> str:
    machine = os.environ.get("GUIDED_AB_MACHINE") or socket.gethostname().split(".")[0]
    return LIMIT_PREFIX + (re.sub(r"[^a-z0-9-]+", "-", machine.lower()).strip("-") or "host")


def _ensure_limit(name: str) -> int:
    """The limit's slots; it is created with one slot per core if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=os.cpu_count() or 1))
            except ObjectAlreadyExists:
                pass
            return client.read_global_concurrency_limit_by_name(name).limit


@contextmanager
def local_cores_slot(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Iterator[str | None]:
    """Hold this machine's slots for the experiment's local arms (none if it has none)."""
    n_local = sum(1 for a in cfg.arms if target_for(a.target).shares_local_cores)
    if not n_local:
        yield None
        return
    from prefect.concurrency.sync import concurrency

    name = limit_name()
    slots = _ensure_limit(name)
    occupy = max(1, min(n_local, slots))
    log(f"taking {occupy} slot(s) of the global concurrency limit {name!r} ({slots} in all) for the local arms; "
        "an experiment holding them finishes first")
    lease = float(os.environ.get("GUIDED_AB_SLOT_LEASE_S") or 120)
    with concurrency(name, occupy=occupy, strict=True, lease_duration=lease):
        log(f"got {occupy} slot(s) of {name!r}")
        yield name
