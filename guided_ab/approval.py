"""A human sign-off before a `switch` is published (`decision.require_approval: true`).

Switching production's structured-output backend is a change a person should own. With
approval required, a `switch` is first recorded as `awaiting-approval` (decision.json and the
reports say what is proposed and that nobody has signed it off); the decide step then waits for
an answer (the Prefect UI shows a form: flows/_approval.py) and records it in decision.json
(`approval`: status, reason, reviewer, when). Approved: the verdict is `switch`. Rejected, or no
answer within `decision.approval_timeout_s`: the verdict is `keep`, with the reason. Off by
default; every other verdict is published as it is.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from guided_ab.config import ExperimentConfig
from guided_ab.store import RunStore

PENDING = "awaiting-approval"


class ApprovalAnswer(BaseModel):
    """The reviewer's answer (the form in the Prefect UI)."""

    decision: Literal["approve", "reject"] = Field(description="approve: publish the switch; reject: keep the control")
    reason: str = Field(min_length=1, max_length=2000, description="why (recorded in decision.json)")
    reviewer: str | None = Field(default=None, max_length=200, description="who signs (optional)")


def needs_approval(cfg: ExperimentConfig, decision: dict[str, Any]) -> bool:
    return cfg.decision.require_approval and decision.get("verdict") == "switch"


def request_text(store: RunStore, decision: dict[str, Any]) -> str:
    """What the reviewer reads above the form: the proposal and the reasons for it."""
    reasons = "\n".join(f"- {r}" for r in decision.get("reasons", []))
    serve = decision.get("serve")
    return (
        f"## Run `{store.run_id}` proposes: switch{f' to `{serve}`' if serve else ''}\n\n{reasons}\n\n"
        f"The full report is `report.html` in the run store ({store.location}). Approve to publish the switch; "
        "reject to keep the control. The answer and the reason are recorded in decision.json."
    )


def mark_pending(store: RunStore, cfg: ExperimentConfig, decision: dict[str, Any]) -> dict[str, Any]:
    """Record that the switch waits for a sign-off: nothing reads `switch` until it is given."""
    pending = {**decision, "verdict": PENDING,
               "approval": {"required": True, "status": "pending", "proposed": decision["verdict"], "requested_at": time.time()}}
    _write(store, cfg, pending)
    return pending


def record(store: RunStore, cfg: ExperimentConfig, pending: dict[str, Any], answer: ApprovalAnswer | None, *,
           why_none: str = "") -> dict[str, Any]:
    """The final decision with the reviewer's answer (None: no answer, `why_none` says why)."""
    approval = dict(pending.get("approval") or {})
    proposed = approval.get("proposed", "switch")
    now = time.time()
    if answer is not None and answer.decision == "approve":
        approval.update(status="approved", reason=answer.reason, reviewer=answer.reviewer, answered_at=now)
        return _write(store, cfg, {**pending, "verdict": proposed, "approval": approval})
    if answer is None:
        approval.update(status="no-answer", reason=why_none or "no answer", answered_at=now)
        why = f"the {proposed} was not signed off ({approval['reason']})"
    else:
        approval.update(status="rejected", reason=answer.reason, reviewer=answer.reviewer, answered_at=now)
        why = f"the {proposed} was rejected by {answer.reviewer or 'the reviewer'}: {answer.reason}"
    reasons = [*pending.get("reasons", []), why]
    return _write(store, cfg, {**pending, "verdict": "keep", "serve": cfg.control.name, "reasons": reasons, "approval": approval})


def _write(store: RunStore, cfg: ExperimentConfig, decision: dict[str, Any]) -> dict[str, Any]:
    from guided_ab.reports.files import write_reports

    store.write_json("decision.json", decision)
    write_reports(store, cfg, store.read_json("evaluation.json"), decision)
    return decision
