"""Estimated vs billed: a run's recorded cost beside what Modal billed for it (`guided-ab cost`).

The estimate (teardown.json) is held time x the arm's $/h (GPUs, CPU cores and memory at list
price: config.ModalSettings.cost_per_hour). What Modal billed comes from its billing report
(`modal.Environment.billing.report`, hourly, with the apps' tags): every app of a run carries
the tag `guided-ab-run=<run id>` (and `guided-ab-arm`), so the rows of the run are summed per
arm and per resource (GPU type, CPU, memory). Modal leaves a partial last hour out of the
report, so the figures are `complete` only once the hour of the last teardown has ended. The
result is written to the run store as cost.json. Without a Modal token it cannot be read, and
says so (NoBilling).
"""

from __future__ import annotations

import math
import time
from typing import Any

from guided_ab.arms import modal as modal_target
from guided_ab.errors import GuidedABError
from guided_ab.store import RunStore

HOUR = 3600.0


class NoBilling(GuidedABError):
    """Modal's billing report cannot be read here (no token, or the call failed)."""


def _entries(store: RunStore) -> list[dict[str, Any]]:
    down = store.read_json("teardown.json", default={"arms": []})
    return [*down.get("earlier", []), *down.get("arms", [])]


def estimated(store: RunStore) -> dict[str, dict[str, Any]]:
    """arm -> target, estimated USD, held hours, and the time window it was held."""
    out: dict[str, dict[str, Any]] = {}
    for e in _entries(store):
        a = out.setdefault(e["arm"], {"target": e.get("target"), "estimated_usd": 0.0, "held_h": 0.0,
                                      "from": math.inf, "to": 0.0})
        a["estimated_usd"] += e.get("cost_usd", 0.0)
        a["held_h"] += e.get("held_s", 0.0) / HOUR
        if e.get("stopped_at"):
            a["from"] = min(a["from"], e["stopped_at"] - e.get("held_s", 0.0))
            a["to"] = max(a["to"], e["stopped_at"])
    return out


def reconcile(store: RunStore, *, now: float | None = None) -> dict[str, Any]:
    """cost.json: per arm, estimated and billed USD (billed: Modal arms only). Raises NoBilling
    (with the estimate in `.estimate`) when Modal's report cannot be read."""
    now = time.time() if now is None else now
    est = estimated(store)
    modal_arms = {arm: a for arm, a in est.items() if a["target"] == modal_target.TARGET.kind}
    result: dict[str, Any] = {
        "run_id": store.run_id, "at": now, "source": None, "complete": None,
        "arms": {arm: {"target": a["target"], "estimated_usd": round(a["estimated_usd"], 4), "held_h": round(a["held_h"], 4),
                       "billed_usd": None, "billed_by_resource": {}} for arm, a in est.items()},
    }
    if not modal_arms:
        result["source"] = "no Modal arms: the estimate is all there is"
        return _write(store, result)
    layer = modal_target.sdk()
    if not layer.has_credentials():
        raise NoBilling("cannot read Modal's billing report: no Modal token here (set MODAL_TOKEN_ID and "
                        "MODAL_TOKEN_SECRET, or `modal token new`); the estimate is in teardown.json")
    start = math.floor(min(a["from"] for a in modal_arms.values()) / HOUR) * HOUR
    last = max(a["to"] for a in modal_arms.values())
    try:
        rows = layer.billing_report(start, now, [modal_target.RUN_TAG, modal_target.ARM_TAG])
    except Exception as err:  # the SDK's errors (auth, plan without billing reports, network)
        raise NoBilling(f"cannot read Modal's billing report: {type(err).__name__}: {err}") from err
    tag = modal_target.tag_value(store.run_id)
    arm_of = {modal_target.tag_value(arm): arm for arm in modal_arms}
    for row in rows:
        tags = row.get("tags") or {}
        if tags.get(modal_target.RUN_TAG) != tag:
            continue
        arm = arm_of.get(tags.get(modal_target.ARM_TAG, ""), tags.get(modal_target.ARM_TAG, "?"))
        a = result["arms"].setdefault(arm, {"target": "modal", "estimated_usd": 0.0, "held_h": 0.0,
                                            "billed_usd": None, "billed_by_resource": {}})
        a["billed_usd"] = round((a["billed_usd"] or 0.0) + row["cost"], 4)
        for res, usd in (row.get("cost_by_resource") or {}).items():
            a["billed_by_resource"][res] = round(a["billed_by_resource"].get(res, 0.0) + usd, 4)
    for arm in modal_arms:
        if result["arms"][arm]["billed_usd"] is None:
            result["arms"][arm]["billed_usd"] = 0.0
    result["source"] = f"Modal billing report, hourly, rows tagged {modal_target.RUN_TAG}={tag}"
    result["complete"] = now >= math.ceil(last / HOUR) * HOUR  # Modal leaves the partial last hour out
    return _write(store, result)


def _write(store: RunStore, result: dict[str, Any]) -> dict[str, Any]:
    est = sum(a["estimated_usd"] for a in result["arms"].values())
    billed = [a["billed_usd"] for a in result["arms"].values() if a["billed_usd"] is not None]
    result["total"] = {"estimated_usd": round(est, 4), "billed_usd": round(sum(billed), 4) if billed else None}
    store.write_json("cost.json", result)
    return result
