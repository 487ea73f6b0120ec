"""External target: an OpenAI-compatible endpoint someone else runs (e.g. today's production)."""

from __future__ import annotations

import time

import httpx

from guided_ab.arms.base import Endpoint, resolve_key


def wait_ready(ep: Endpoint, deadline_s: float, *, poll_s: float = 2.0) -> float:
    """Wait until GET /v1/models answers 200 (a cold-starting endpoint may answer 503 first)."""
    key = resolve_key(ep.key_ref)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < deadline_s:
        try:
            r = httpx.get(ep.base_url + "/v1/models", headers=headers, timeout=10)
            if r.status_code == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}"
            if r.status_code in (401, 403):
                raise RuntimeError(f"endpoint of arm '{ep.arm}' refused our API key ({last}): check the key variable")
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(poll_s)
    raise RuntimeError(f"endpoint of arm '{ep.arm}' ({ep.base_url}) not ready within {deadline_s:g} s (last: {last})")
