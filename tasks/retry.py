"""Retry only what a retry can fix: network blips and cold starts, never bad input or a bug.

What counts as transient, in order (guided_ab/errors.py draws the tree):
- a UserError (ConfigError, RunStateError) never: the same input fails the same way again;
- an ArmError when its `transient` flag says so: ArmNotReady (an endpoint still cold-starting or
  refusing connections at its deadline) is, ArmRefused (401/403) or a dead local server is not;
- otherwise the network's own errors (httpx transport errors, ConnectionError, TimeoutError),
  unless Prefect's own API client raised them: the orchestrator is unreachable (e.g. its
  temporary server died with the Ctrl-C that stopped the task), which a retry, itself
  scheduled through that API, cannot fix. Progress updates are never retried as if they were
  requests (tasks/requests.py drops a failed one).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx
from prefect.states import State

from guided_ab.errors import ArmError, UserError

TRANSIENT = (httpx.TransportError, ConnectionError, TimeoutError)


_NETWORK_LIBS = ("/httpx/", "/httpcore/", "/anyio/", "/asyncio/", "/concurrent/", "/h11/", "/ssl.py", "/socket.py")


def from_prefect_api(exc: BaseException) -> bool:
    """Was `exc` raised by a call into Prefect's API client (below it, only network libraries)?"""
    tb: TracebackType | None = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    caller = next((f for f in reversed(frames) if not any(lib in f for lib in _NETWORK_LIBS)), "")
    return "/prefect/" in caller


def is_transient(exc: BaseException | None) -> bool:
    """Would the same call, tried again a little later, plausibly succeed?"""
    if exc is None or isinstance(exc, UserError):
        return False
    if isinstance(exc, ArmError):
        return exc.transient
    return isinstance(exc, TRANSIENT) and not from_prefect_api(exc)


def retry_if_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry_condition_fn: continue to the retry policy only for transient errors."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
