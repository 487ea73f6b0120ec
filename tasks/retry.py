"""Retry only what a retry can fix: network blips and cold starts, never bad input or a bug.

What counts as transient, in order (guided_ab/errors.py draws the tree):
- a UserError (ConfigError, RunStateError) never: the same input fails the same way again;
- an ArmError when its `transient` flag says so: ArmNotReady (an endpoint still cold-starting or
  refusing connections at its deadline) is, ArmRefused (401/403) or a dead local server is not;
- otherwise the network's own errors (httpx transport errors, ConnectionError, TimeoutError).
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect.states import State

from guided_ab.errors import ArmError, UserError

TRANSIENT = (httpx.TransportError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    """Would the same call, tried again a little later, plausibly succeed?"""
    if exc is None or isinstance(exc, UserError):
        return False
    if isinstance(exc, ArmError):
        return exc.transient
    return isinstance(exc, TRANSIENT)


def retry_if_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry_condition_fn: continue to the retry policy only for transient errors."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
