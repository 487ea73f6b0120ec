"""Stop endpoints that crashed runs left behind: local vLLM servers (by their state records)
and Modal apps (by name prefix and age). try/finally and Prefect hooks cover failures and
cancellations; only a reaper covers a SIGKILL'd process. Runs still in progress (`protect`:
their run ids, e.g. from the Prefect API in flows/reaper.py) are never reaped, whatever their age."""

from __future__ import annotations

from collections.abc import Callable, Collection

from guided_ab.arms.targets import TARGET_MODULES, target_for


def reap_everything(
    *, run_id: str | None = None, older_than_s: float = 0.0, modal_prefix: str | None = None,
    force: bool = False, protect: Collection[str] = (), log: Callable[[str], None] = print,
) -> list[str]:
    """Ask every target to stop its leftovers (Modal's only with `modal_prefix`), never those of
    the runs in `protect` (unless `force`); one line per thing stopped."""
    stopped = []
    for kind in TARGET_MODULES:
        for msg in target_for(kind).reap(run_id=run_id, older_than_s=older_than_s, prefix=modal_prefix, force=force,
                                         protect=protect):
            log(msg)
            stopped.append(msg)
    return stopped
