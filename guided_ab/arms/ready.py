"""One readiness poller for every target: poll an endpoint until it answers 200, or say why not.

While a server starts, "not yet" looks like a refused connection, a timeout, a dropped
connection or HTTP 503 (a scaled-to-zero endpoint cold-starting): all of that means keep
waiting, and at the deadline it becomes ArmNotReady, which is transient (the Prefect task
`wait-endpoints` retries it). Two answers end the wait at once, because waiting cannot help:
401/403 (ArmRefused: the key is wrong) and, for a local server, its process having exited
(ServerStartError, with the tail of its log).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from guided_ab.arms.base import Endpoint, resolve_key
from guided_ab.errors import ArmNotReady, ArmRefused, ServerStartError, UserError
from guided_ab.redact import redact


def log_tail(path: str | None, lines: int = 20) -> str:
    """The last lines of a server's log ("" if there is none)."""
    if not path or not Path(path).is_file():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _key_hint(ep: Endpoint) -> str:
    kind, _, where = (ep.key_ref or "").partition(":")
    if kind == "derived":  # a per-run key (arms/base.py derived_key): the team key here differs from deploy's
        return (f"check the key variable {where.partition(':')[0]}: the run's key is derived from it, and it must be "
                "the one the deploy phase had")
    return f"check the key variable {where}" if kind == "env" else "check the key variable"


def wait_until_ready(
    ep: Endpoint,
    deadline_s: float,
    *,
    what: str,
    hint: str = "",
    path: str = "/v1/models",
    send_key: bool = True,
    poll_s: float = 2.0,
    request_timeout_s: float = 10.0,
    alive: Callable[[], bool] | None = None,
    not_ready: type[ArmNotReady] = ArmNotReady,
) -> float:
    """Poll GET `path` until it answers 200; seconds waited.

    what: the subject of the error messages ("endpoint of arm 'x' (url)").
    hint: appended to the deadline's message (what to raise, where the logs are).
    send_key: send the endpoint's API key (GET /v1/models needs it; vLLM's /health does not).
    alive: for a process this run started: False once it has exited, which ends the wait.
    not_ready: the ArmNotReady subclass to raise at the deadline (a target's own, e.g. ModalNotReady).
    """
    key = resolve_key(ep.key_ref) if send_key else None
    try:  # a server's log is server text: shown with the key redacted (a server may log what it was sent)
        secrets = [key or resolve_key(ep.key_ref)]
    except UserError:
        secrets = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.monotonic()
    last = "no answer yet"
    # redirects are followed (Modal's web endpoints may redirect); httpx drops the key on a cross-origin one
    with httpx.Client(follow_redirects=True, headers=headers) as http:
        while True:
            if alive is not None and not alive():
                raise ServerStartError(
                    f"{what} exited during start-up; last lines of {ep.log_path}:\n{redact(log_tail(ep.log_path), secrets)}"
                )
            left = deadline_s - (time.monotonic() - t0)
            if left <= 0:
                break
            try:
                # never a uselessly short timeout: the last poll may end up to 2 s past the deadline
                r = http.get(ep.base_url + path, timeout=min(request_timeout_s, max(left, 2.0)))
                if r.status_code == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as err:
                last = type(err).__name__
            else:
                if r.status_code in (401, 403):
                    raise ArmRefused(f"{what} refused our API key ({last}): {_key_hint(ep)}")
            time.sleep(max(0.0, min(poll_s, deadline_s - (time.monotonic() - t0))))
    message = f"{what} was not ready within {deadline_s:g} s (last: {last}){hint}"
    if ep.log_path:
        message += "\n" + (redact(log_tail(ep.log_path), secrets) or "")
    raise not_ready(message)
