"""Retry only what a retry can fix: network blips and cold starts, never bad input or a bug."""

from __future__ import annotations

import httpx
from prefect.states import State

from guided_ab.config import ConfigError

TRANSIENT = (httpx.TransportError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, ConfigError)


def retry_if_transient(task, task_run, state: State) -> bool:
    """Prefect retry_condition_fn: continue to the retry policy only for transient errors."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
