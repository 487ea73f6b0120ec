"""Phase 3, the other ending: re-deploy the control's configuration as production and stop the
live control (guided_ab/promote.py), behind the same sign-off as promote: with
`decision.require_approval` (or `ask_sign_off`, as the alert automation in prefect.yaml passes),
the flow run pauses with the approve/reject form of flows/_approval.py first."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from guided_ab import approval
from guided_ab import promote as P

from ._approval import POLL_S
from ._common import DEFAULT_STORE, keys_from_secret_blocks, open_run
from ._monitor_window import set_window_schedule


@flow(name="revert", log_prints=True)
def revert(run_id: str, store: str = DEFAULT_STORE, reason: str = "", dry_run: bool = False,
           ask_sign_off: bool | None = None) -> dict:
    rs, cfg = open_run(run_id, store)
    keys_from_secret_blocks(["GUIDED_AB_MODAL_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"])
    rec, lines = P.revert_plan(rs)
    text = "\n".join(lines)
    if dry_run:
        print(text + "\ndry run: nothing was deployed or recorded")
        return {**rec, "text": text, "dry_run": True}
    if cfg.decision.require_approval if ask_sign_off is None else ask_sign_off:
        form = RunInput.subclass_from_base_model_type(approval.ApprovalAnswer).with_initial_data(description=text)
        timeout = cfg.decision.approval_timeout_s
        get_run_logger().info(f"run {run_id}: the revert waits for a sign-off (no answer in {timeout} s: no revert)")
        try:
            given = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=POLL_S, key="revert-approval")
        except FlowPauseTimeout:
            return {**rec, "text": "no sign-off: not reverted"}
        answer = approval.ApprovalAnswer.model_validate(given.model_dump(include=set(approval.ApprovalAnswer.model_fields)))
        if answer.decision != "approve":
            return {**rec, "text": f"revert rejected: {answer.reason}"}
        reason = reason or f"approved by {answer.reviewer or 'a reviewer'}: {answer.reason}"
    result = P.revert(rs, reason=reason)
    set_window_schedule(run_id, store, rec["window"]["cadence_hours"], active=False)
    return result
