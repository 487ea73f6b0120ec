"""The request record: exactly one per request sent, the unit every statistic is computed from."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

Outcome = Literal[
    "success",  # parsed JSON that validates against the schema
    "rejected",  # HTTP 4xx: the server refused the request (message kept in `error`)
    "server_error",  # HTTP 5xx
    "timeout",  # no complete answer within the per-request timeout
    "connection_error",  # refused, reset, cut stream, protocol garbage
    "truncated",  # finish_reason == "length": the answer hit max_tokens
    "invalid_json",  # the answer is not JSON (or an HTTP 200 body that is not a completion)
    "schema_violation",  # JSON that does not validate against the schema
    # the answer is JSON but our validator could not say whether it fits the schema: the
    # server answered (latency and tokens are real), the outcome is unknown. Counted apart from
    # both success and schema_violation; never transient (a re-send would not validate faster).
    "validation_timeout",  # validation ran past workload.validation_timeout_s (e.g. a backtracking regex)
    "validation_error",  # the validator raised (our side, not the answer's: e.g. a $ref it cannot resolve)
    # tool calls (a replayed or tool-mode request with `tools` + `tool_choice`)
    "no_tool_call",  # the answer called no function although the request required one
    "unknown_tool",  # the answer called a function the request did not offer
    # workload problems: the server refused the request for a reason unrelated to structured
    # output; never a backend's failure (backend attribution "none"), excluded from the comparison
    "context_overflow",  # HTTP 400: the prompt plus max_tokens does not fit the model's context
    "invalid_request",  # HTTP 400: another parameter refusal that is not a grammar/schema refusal
]
OUTCOMES: tuple[str, ...] = Outcome.__args__  # type: ignore[attr-defined]
TRANSIENT_OUTCOMES = frozenset({"server_error", "timeout", "connection_error"})
# answered, but not judged against the schema (see above)
UNVALIDATED_OUTCOMES = frozenset({"validation_timeout", "validation_error"})
# refused by the server for what the workload asked (see above): excluded from the backend comparison
WORKLOAD_OUTCOMES = frozenset({"context_overflow", "invalid_request"})
NO_BACKEND = "none"  # the `backend` of a request that never reached grammar compilation


class RequestRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    phase: str  # observe | ab | canary
    arm: str
    request_id: str  # idempotency key: unique per planned request within the run
    schema_id: str
    subset: str
    order_index: int  # position in the phase's planned order (across arms)
    pair_index: int  # the schema's index in the phase: same value on every arm = one pair
    warmup: bool
    first_for_schema: bool  # first request with this schema on this arm in the run (grammar compile)
    stream: bool
    attempt: int  # 1 on the first send; a resumed phase re-sends unrecorded requests as attempt 2, ...
    sent_at: float  # unix time the request was sent
    ttft_s: float | None = None  # time to first content token (streaming only)
    latency_s: float | None = None  # end to end, send to last byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    http_status: int | None = None
    backend: str | None = None  # structured-output backend the server resolved for this request
    outcome: Outcome
    error: str | None = None
    output: str | None = None
    custom_id: str | None = None  # the replayed request's `custom_id` (replay workloads; None otherwise)
    # the container that answered (the attribution middleware's x-guided-ab-served-by header:
    # Modal's task id, else hostname:pid); None without an answer, and in records written before it
    served_by: str | None = None
    # open-loop load profiles (workload.load): when the request was due and how late it went out
    # (None in a closed loop, and in journals written before open loops existed)
    scheduled_at: float | None = None  # unix time its arrival was scheduled (both arms of a pair: one instant)
    send_lag_s: float | None = None  # sent_at - scheduled_at: > 0 when the in-flight cap or a busy loop held it back

    @classmethod
    def from_response(cls, raw, outcome: Outcome, error: str | None, **planned) -> RequestRecord:
        """The record of one sent request: its planned fields plus what came back.

        `raw` is a client.RawResponse; `backend` comes from the server only, never from the config.
        """
        return cls(
            **planned, sent_at=raw.sent_at, ttft_s=raw.ttft_s, latency_s=raw.latency_s,
            prompt_tokens=raw.prompt_tokens, completion_tokens=raw.completion_tokens,
            finish_reason=raw.finish_reason, http_status=raw.http_status, backend=raw.backend,
            outcome=outcome, error=error, output=raw.text, served_by=getattr(raw, "served_by", None),
        )


RECORD_COLUMNS: list[str] = list(RequestRecord.model_fields)


def records_frame(records: list[RequestRecord] | list[dict]) -> pd.DataFrame:
    """A DataFrame with the record columns in a fixed order (also when empty)."""
    rows = [r.model_dump() if isinstance(r, RequestRecord) else r for r in records]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)
