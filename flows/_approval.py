"""The decide step with its human sign-off: decide, and when a `switch` needs approval
(`decision.require_approval: true`), pause the flow run with a form in the Prefect UI
(approve / reject, reason, reviewer: `pause_flow_run(wait_for_input=...)`), record the answer
in decision.json (guided_ab/approval.py), and only then publish the decision as artifacts.

Resume from the UI (the paused flow run shows the form), or through the API:
    from prefect.flow_runs import resume_flow_run
    resume_flow_run(flow_run_id, run_input={"decision": "reject", "reason": "p99 regressed in prod"})
No answer within `decision.approval_timeout_s`: recorded as not approved, the verdict is `keep`.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from guided_ab import approval
from guided_ab.config import DecisionOverrides, ExperimentConfig
from guided_ab.store import RunStore
from tasks.analysis import decide_run
from tasks.artifacts import publish_results

POLL_S = 5  # how often the paused flow run looks for the answer


def decide_and_publish(rs: RunStore, cfg: ExperimentConfig, thresholds: DecisionOverrides | None = None) -> dict[str, Any]:
    """decision.json (signed off when the config asks for it), then the artifacts."""
    decision = decide_run(rs, thresholds)
    if approval.needs_approval(cfg, decision):
        decision = ask_for_sign_off(rs, cfg, decision)
    publish_results(rs)
    return decision


def ask_for_sign_off(rs: RunStore, cfg: ExperimentConfig, decision: dict[str, Any]) -> dict[str, Any]:
    log = get_run_logger()
    pending = approval.mark_pending(rs, cfg, decision)
    text = approval.request_text(rs, decision)
    create_markdown_artifact(text, key=f"{cfg.name}-approval"[:100], description=f"run {rs.run_id}: awaiting sign-off")
    form = RunInput.subclass_from_base_model_type(approval.ApprovalAnswer).with_initial_data(description=text)
    timeout = cfg.decision.approval_timeout_s
    log.info(f"run {rs.run_id}: the switch waits for a sign-off (resume this flow run with approve/reject "
             f"within {timeout} s; no answer = keep)")
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=POLL_S, key="approval")
    except FlowPauseTimeout:
        final = approval.record(rs, cfg, pending, None, why_none=f"no answer within {timeout} s")
    else:
        given = approval.ApprovalAnswer.model_validate(answer.model_dump(include=set(approval.ApprovalAnswer.model_fields)))
        final = approval.record(rs, cfg, pending, given)
    log.info(f"run {rs.run_id}: sign-off {final['approval']['status']}: verdict {final['verdict']}")
    return final
