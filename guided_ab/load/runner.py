"""Send a phase's planned requests to the arms' endpoints and record each exactly once.

Exactly-once bookkeeping, so a phase killed mid-way can be re-run with the same run id:
- before a request is sent, its id is appended to `records/<phase>.sent` (the attempt log);
- after it ends, its record is appended to the phase journal;
- a re-run skips every planned request that already has a record and re-sends the others
  with the next attempt number. A request in flight when the process died was sent but
  never recorded: it is sent again, and only the new attempt is recorded.
Both files belong to the run store: RunStore.open_journal appends them (one write() per line,
fsync'd in a thread, see store.PhaseJournal), RunStore.recorded_ids and sent_counts read them.

Validation runs in worker threads, bounded by `wl.validation_timeout_s` (load/classify.py): a slow
answer to validate never stalls the event loop, which times every other request. What a server
sent is stored with every key of the run redacted (guided_ab/redact.py).

Load: `wl.concurrency` workers share one pooled HTTP session (guided_ab.load.client.new_session) and
take requests in planned order; with `arrivals` (seconds from the start, one per pending
request, e.g. Poisson) a worker also waits for its request's arrival time (open loop, capped at
`wl.concurrency` in flight).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guided_ab.arms.base import Endpoint, resolve_key
from guided_ab.config import Workload
from guided_ab.load.classify import classify_async
from guided_ab.load.client import chat_body, new_session, request_body, send_chat
from guided_ab.load.validate import schema_key
from guided_ab.plan import Plan, PlannedRequest
from guided_ab.records import NO_BACKEND, WORKLOAD_OUTCOMES, RequestRecord
from guided_ab.redact import redact
from guided_ab.replay import tool_spec
from guided_ab.store import RunStore

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


async def run_plan(
    plan: Plan,
    endpoints: dict[str, Endpoint],
    store: RunStore,
    wl: Workload,
    *,
    progress: Progress | None = None,
    arrivals: Sequence[float] | None = None,
) -> PhaseResult:
    """Send the plan's requests that have no record yet; one journal record per request.

    arrivals: optional send times in seconds from the start, one per pending request in planned
    order (non-decreasing); without it requests go as fast as `wl.concurrency` workers allow.
    """
    recorded = store.recorded_ids(plan.phase)
    attempts = store.sent_counts(plan.phase)
    pending = [r for r in plan.requests if r.request_id not in recorded]
    del recorded
    result = PhaseResult(plan.phase, len(plan.requests), len(plan.requests) - len(pending), 0)
    if arrivals is not None and len(arrivals) < len(pending):
        raise ValueError(f"arrivals has {len(arrivals)} times for {len(pending)} pending requests")
    keys = {arm: resolve_key(ep.key_ref) for arm, ep in endpoints.items()}
    secrets = list(keys.values())
    schema_keys: dict[str, str] = {}  # schema id -> its validator cache key (computed once)
    queue: asyncio.Queue[tuple[int, PlannedRequest]] = asyncio.Queue()
    for i, r in enumerate(pending):  # workers take requests in planned (interleaved) order
        queue.put_nowait((i, r))
    journal = store.open_journal(plan.phase)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(http, req: PlannedRequest) -> None:
        ep = endpoints[req.arm]
        item = plan.items[req.schema_id]
        if item.body is not None:  # a replayed request (or tool mode): the same body to every arm
            body = request_body(ep.model, req.stream, item.body)
        else:
            body = chat_body(
                ep.model, item.render(wl.prompt_template), item.json_schema, name=item.schema_id,
                temperature=wl.temperature, max_tokens=wl.max_tokens, stream=req.stream,
            )
        attempts[req.request_id] += 1
        journal.log_sent(req.request_id)
        raw = await send_chat(http, ep.base_url, body, api_key=keys[req.arm], timeout_s=wl.timeout_s)
        raw.text, raw.error, raw.backend = (redact(x, secrets) for x in (raw.text, raw.error, raw.backend))
        if req.schema_id not in schema_keys:
            schema_keys[req.schema_id] = schema_key(item.json_schema)
        outcome, error = await classify_async(raw, item.json_schema, timeout_s=wl.validation_timeout_s,
                                              key=schema_keys[req.schema_id], tools=tool_spec(item.body),
                                              max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"))
        error = redact(error, secrets)
        if outcome in WORKLOAD_OUTCOMES:  # the workload's problem (refused, or out of context): no backend to blame
            raw.backend = NO_BACKEND
        if raw.tool_calls is not None and not raw.text:  # the answer is its calls: kept as they came
            raw.text = redact(json.dumps(raw.tool_calls, ensure_ascii=False), secrets)
        rec = RequestRecord.from_response(
            raw, outcome, error,
            run_id=store.run_id, phase=plan.phase, arm=req.arm, request_id=req.request_id,
            schema_id=req.schema_id, subset=item.subset, order_index=req.order_index,
            pair_index=req.pair_index, warmup=req.warmup, first_for_schema=req.first_for_schema,
            stream=req.stream, attempt=attempts[req.request_id], custom_id=item.custom_id,
        )
        journal.append(rec)
        result.sent_now += 1
        result.outcomes[outcome] += 1
        if progress:
            progress(result.recorded, result.planned, result.outcomes)

    async def worker(http) -> None:
        while True:
            try:
                i, req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if arrivals is not None:
                wait = start + arrivals[i] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await one(http, req)

    try:
        async with new_session(wl.concurrency, connect_timeout_s=min(10.0, wl.timeout_s)) as http:
            if progress:
                progress(result.recorded, result.planned, result.outcomes)
            tasks = [loop.create_task(worker(http)) for _ in range(min(wl.concurrency, max(1, len(pending))))]
            try:
                await asyncio.gather(*tasks)
            finally:  # one worker failed (or we were cancelled): stop the others before the journal closes
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await journal.close()
    return result
