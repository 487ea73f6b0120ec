"""Stop endpoints that crashed runs left behind: local vLLM servers (by their state records)
and Modal apps (by name prefix and age). try/finally and Prefect hooks cover failures and
cancellations; only a reaper covers a SIGKILL'd process."""

from __future__ import annotations

from collections.abc import Callable

from guided_ab.arms import local


def reap_everything(
    *, run_id: str | None = None, older_than_s: float = 0.0, modal_prefix: str | None = None,
    force: bool = False, log: Callable[[str], None] = print,
) -> list[str]:
    stopped = []
    for rec in local.reap(run_id=run_id, older_than_s=older_than_s, force=force):
        msg = f"stopped local server pid={rec['pid']} port={rec['port']} run={rec['run_id']} arm={rec['arm']}"
        log(msg)
        stopped.append(msg)
    if modal_prefix:
        from guided_ab.arms import modal as modal_target

        for name in modal_target.reap(modal_prefix, older_than_s):
            msg = f"stopped Modal app {name}"
            log(msg)
            stopped.append(msg)
    return stopped
