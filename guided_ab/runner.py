"""Send a phase's planned requests to the arms' endpoints and record each exactly once.

Exactly-once bookkeeping, so a phase killed mid-way can be re-run with the same run id:
- before a request is sent, its id is appended to `records/<phase>.sent` (the attempt log);
- after it ends, its record is appended to the phase journal (fsync'd);
- a re-run skips every planned request that already has a record and re-sends the others
  with the next attempt number. A request in flight when the process died was sent but
  never recorded: it is sent again, and only the new attempt is recorded.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import httpx

from .client import chat_body, send_chat
from .config import Workload
from .plan import Plan, PlannedRequest
from .records import RequestRecord
from .store import RunStore
from .targets.base import Endpoint, resolve_key
from .validation import classify

Progress = Callable[[int, int, Counter], None]


@dataclass
class PhaseResult:
    phase: str
    planned: int
    recorded_before: int
    sent_now: int
    outcomes: Counter = field(default_factory=Counter)

    @property
    def recorded(self) -> int:
        return self.recorded_before + self.sent_now


def _sent_log(store: RunStore, phase: str) -> Counter:
    p = store.path("records", f"{phase}.sent")
    if not p.is_file():
        return Counter()
    return Counter(line.strip() for line in p.read_text().splitlines() if line.strip())


def _log_sent(store: RunStore, phase: str, request_id: str) -> None:
    p = store.path("records", f"{phase}.sent")
    with open(p, "a", encoding="utf-8") as f:
        f.write(request_id + "\n")
        f.flush()
        os.fsync(f.fileno())


async def run_plan(
    plan: Plan,
    endpoints: dict[str, Endpoint],
    store: RunStore,
    wl: Workload,
    *,
    progress: Progress | None = None,
) -> PhaseResult:
    recorded = {r.request_id for r in store.journal(plan.phase)}
    attempts = _sent_log(store, plan.phase)
    pending = [r for r in plan.requests if r.request_id not in recorded]
    result = PhaseResult(plan.phase, len(plan.requests), len(plan.requests) - len(pending), 0)
    keys = {arm: resolve_key(ep.key_ref) for arm, ep in endpoints.items()}
    queue: asyncio.Queue[PlannedRequest] = asyncio.Queue()
    for r in pending:  # workers take requests in planned (interleaved) order
        queue.put_nowait(r)

    async def one(http: httpx.AsyncClient, req: PlannedRequest) -> None:
        ep = endpoints[req.arm]
        item = plan.items[req.schema_id]
        body = chat_body(
            ep.model, item.render(wl.prompt_template), item.json_schema, name=item.schema_id,
            temperature=wl.temperature, max_tokens=wl.max_tokens, stream=req.stream,
        )
        attempts[req.request_id] += 1
        _log_sent(store, plan.phase, req.request_id)
        raw = await send_chat(http, ep.base_url, body, api_key=keys[req.arm], timeout_s=wl.timeout_s)
        outcome, error = classify(raw, item.json_schema)
        rec = RequestRecord(
            run_id=store.run_id, phase=plan.phase, arm=req.arm, request_id=req.request_id,
            schema_id=req.schema_id, subset=item.subset, order_index=req.order_index,
            pair_index=req.pair_index, warmup=req.warmup, first_for_schema=req.first_for_schema,
            stream=req.stream, attempt=attempts[req.request_id], sent_at=raw.sent_at,
            ttft_s=raw.ttft_s, latency_s=raw.latency_s, prompt_tokens=raw.prompt_tokens,
            completion_tokens=raw.completion_tokens, finish_reason=raw.finish_reason,
            http_status=raw.http_status, backend=raw.backend,  # from the server only: never assumed from the config
            outcome=outcome, error=error, output=raw.text,
        )
        store.append_record(rec)
        result.sent_now += 1
        result.outcomes[outcome] += 1
        if progress:
            progress(result.recorded, result.planned, result.outcomes)

    async def worker(http: httpx.AsyncClient) -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(http, req)

    limits = httpx.Limits(max_connections=wl.concurrency, max_keepalive_connections=wl.concurrency)
    timeout = httpx.Timeout(wl.timeout_s, connect=min(10.0, wl.timeout_s))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        if progress:
            progress(result.recorded, result.planned, result.outcomes)
        await asyncio.gather(*(worker(http) for _ in range(min(wl.concurrency, max(1, len(pending))))))
    return result
