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

Load (one pooled HTTP session, guided_ab.load.client.new_session):
- closed loop (the default, `wl.load.<phase>.profile: closed`): `wl.concurrency` workers take
  requests in planned order, each sending its next when its last has been answered;
- open loop (`constant` / `poisson`, guided_ab.load.arrivals): one dispatcher sleeps until just
  before each arrival's scheduled time and starts its sends as tasks, never waiting for an
  answer, so the arrivals keep their clock however slow the server is; each task builds its
  request and takes a connection, and the client writes it at the scheduled instant. One
  arrival per pair: both arms of a pair are sent at the same scheduled instant. At most `max_in_flight` requests are in flight; an
  arrival the cap (or a late loop) holds back is sent as soon as it can and recorded with its
  lag (`scheduled_at`, `send_lag_s` = the request's `sent_at` minus `scheduled_at`), never
  silently shifted. The schedule follows from the workload seed, the phase and the look (a
  sequential A/B: each look is a new batch with its own schedule at the same rate); a re-run
  phase sends its unrecorded requests on their original schedule, shifted to the new start.
`arrivals` (seconds from the start, one per pending request) is the same dispatcher with one
request per arrival, capped at `wl.concurrency` (bench/ours_worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guided_ab.arms.base import Endpoint, resolve_key
from guided_ab.config import LoadProfile, Workload
from guided_ab.load.arrivals import arrival_times, schedule_seed
from guided_ab.load.classify import classify_async
from guided_ab.load.client import chat_body, new_session, request_body, send_chat
from guided_ab.load.send_clock import SendClock, precise_loop
from guided_ab.load.validate import schema_key
from guided_ab.plan import Plan, PlannedRequest
from guided_ab.records import NO_BACKEND, WORKLOAD_OUTCOMES, RequestRecord
from guided_ab.redact import redact
from guided_ab.replay import tool_spec
from guided_ab.store import RunStore

Progress = Callable[[int, int, Counter], None]
# An open loop starts each send this long before its scheduled instant (see run_plan's open_loop):
# building the request and taking a pooled connection take well under a millisecond here
# (bench/open_loop_accuracy.py); a new connection to a distant server may take longer, and is lag.
PREPARE_S = 0.005
# With the send clock the bytes wait for their instant outside the event loop, so a send can start
# earlier: a loop held up for up to this long (a garbage collection, a burst of answers) costs no lag.
# 20 ms was not enough at 500/s on this 2-core VM on a slow day (the loop ~1 core busy, lagging up to
# ~20 ms: send lag p99 2-9 ms); 100 ms: p99 1.0-1.3 ms (bench/open_loop_accuracy.py).
PREPARE_CLOCKED_S = 0.1
# ...but a held request holds its slot of the cap: at most this share of the cap is spent on it.
PREPARE_CAP_SHARE = 0.25


def prepare_ahead(schedule: Sequence[tuple[float, Sequence[PlannedRequest]]], cap: int, clocked: bool) -> float:
    """How long before its instant an open loop starts a send: PREPARE_S without a send clock;
    with one, PREPARE_CLOCKED_S, shortened (not below PREPARE_S) so that the requests prepared
    ahead take at most PREPARE_CAP_SHARE of `cap` at the schedule's mean rate, since a held
    request counts against max_in_flight and must not hold back the arrivals after it."""
    if not clocked or len(schedule) < 2:
        return PREPARE_S if not clocked else PREPARE_CLOCKED_S
    span = schedule[-1][0] - schedule[0][0]
    per_s = sum(len(reqs) for _, reqs in schedule) / span if span > 0 else float("inf")
    return max(PREPARE_S, min(PREPARE_CLOCKED_S, PREPARE_CAP_SHARE * cap / per_s))


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


def open_loop_schedule(plan: Plan, pending: Sequence[PlannedRequest], load: LoadProfile,
                       seed: int) -> list[tuple[float, list[PlannedRequest]]]:
    """(seconds from the start, the requests due then) per arrival, for the pending requests.

    One arrival per pair (warm-up pairs included, first), in planned order: both arms of a pair
    share its instant. A sequential plan's looks each get their own schedule (seeded by the
    look); a fixed plan is one schedule. Each time is the arrival's place on the full schedule of
    its look, shifted so that the first pending arrival is at 0: a resumed phase keeps the spacing
    of what it still has to send, relative to its new start.
    """
    assert load.rate is not None and load.profile != "closed"
    todo = {r.request_id for r in pending}
    segments = [(lk.look, lk.first_order, lk.end_order) for lk in plan.looks] or [(0, 0, len(plan.requests))]
    out: list[tuple[float, list[PlannedRequest]]] = []
    offset = 0.0
    for look, lo, hi in segments:
        reqs = plan.requests[lo:hi]
        pairs = list(dict.fromkeys(r.pair_index for r in reqs))  # arrivals in planned order
        times = dict(zip(pairs, arrival_times(load.profile, load.rate, len(pairs), schedule_seed(seed, plan.phase, look))))
        groups: dict[int, list[PlannedRequest]] = {}
        for r in reqs:
            if r.request_id in todo:
                groups.setdefault(r.pair_index, []).append(r)
        if not groups:
            continue
        first = times[next(iter(groups))]
        start = offset + (1.0 / load.rate if out else 0.0)  # a later look starts one mean gap after the last
        out += [(start + times[p] - first, rs) for p, rs in groups.items()]
        offset = out[-1][0]
    return out


async def run_plan(
    plan: Plan,
    endpoints: dict[str, Endpoint],
    store: RunStore,
    wl: Workload,
    *,
    progress: Progress | None = None,
    arrivals: Sequence[float] | None = None,
    load: LoadProfile | None = None,
) -> PhaseResult:
    """Send the plan's requests that have no record yet; one journal record per request.

    load: the phase's load profile (default: a closed loop of `wl.concurrency`); an open one
    (constant, poisson) sends on open_loop_schedule's arrivals, at most `load.max_in_flight` at once.
    arrivals: optional send times in seconds from the start, one per pending request in planned
    order (non-decreasing), capped at `wl.concurrency` in flight; without it (and without an open
    `load`) requests go as fast as `wl.concurrency` workers allow.
    """
    recorded = store.recorded_ids(plan.phase)
    attempts = store.sent_counts(plan.phase)
    pending = [r for r in plan.requests if r.request_id not in recorded]
    del recorded
    result = PhaseResult(plan.phase, len(plan.requests), len(plan.requests) - len(pending), 0)
    if arrivals is not None and len(arrivals) < len(pending):
        raise ValueError(f"arrivals has {len(arrivals)} times for {len(pending)} pending requests")
    schedule: list[tuple[float, list[PlannedRequest]]] | None = None
    cap = wl.concurrency
    if load is not None and load.open_loop:
        schedule = open_loop_schedule(plan, pending, load, wl.seed)
        cap = load.max_in_flight or cap
    elif arrivals is not None:
        schedule = [(arrivals[i], [r]) for i, r in enumerate(pending)]
    keys = {arm: resolve_key(ep.key_ref) for arm, ep in endpoints.items()}
    secrets = list(keys.values())
    schema_keys: dict[str, str] = {}  # schema id -> its validator cache key (computed once)
    journal = store.open_journal(plan.phase)
    loop = asyncio.get_running_loop()
    # An open loop on asyncio's own loop sends through the send clock (to tens of microseconds,
    # guided_ab.load.send_clock); on uvloop it holds each request in the event loop (~0.1-0.5 ms).
    clock = SendClock() if schedule is not None and precise_loop(loop) else None

    async def one(http, req: PlannedRequest, scheduled_at: float | None = None, not_before: float | None = None) -> None:
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
        raw = await send_chat(http, ep.base_url, body, api_key=keys[req.arm], timeout_s=wl.timeout_s, not_before=not_before)
        raw.text, raw.error, raw.backend = (redact(x, secrets) for x in (raw.text, raw.error, raw.backend))
        if req.schema_id not in schema_keys:
            schema_keys[req.schema_id] = schema_key(item.json_schema)
        outcome, error = await classify_async(raw, item.json_schema, timeout_s=wl.validation_timeout_s,
                                              key=schema_keys[req.schema_id], tools=tool_spec(item.body),
                                              max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"))
        error = redact(error, secrets)
        if clock is not None and clock.dead is not None:  # its send time is unknown: no record, the phase stops
            raise clock.dead
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
            scheduled_at=scheduled_at, send_lag_s=None if scheduled_at is None else raw.sent_at - scheduled_at,
        )
        journal.append(rec)
        result.sent_now += 1
        result.outcomes[outcome] += 1
        if progress:
            progress(result.recorded, result.planned, result.outcomes)

    async def closed_loop(http) -> None:
        queue: asyncio.Queue[PlannedRequest] = asyncio.Queue()
        for r in pending:  # workers take requests in planned (interleaved) order
            queue.put_nowait(r)

        async def worker() -> None:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(http, req)

        tasks = [loop.create_task(worker()) for _ in range(min(wl.concurrency, max(1, len(pending))))]
        try:
            await asyncio.gather(*tasks)
        finally:  # one worker failed (or we were cancelled): stop the others before the journal closes
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def open_loop(http, schedule: list[tuple[float, list[PlannedRequest]]]) -> None:
        # The dispatcher only sleeps, takes a slot and starts a task: building the body, sending,
        # validating and journalling run in the task, so they never delay the next arrival. It
        # starts each send `ahead` of its instant: the request is built and a connection taken by
        # then, and the client holds its bytes until the scheduled instant (send_chat's not_before;
        # the send clock's last byte when there is one), so that work is not the request's lag.
        # A held request takes its slot of the cap from then on. perf_counter, not loop.time():
        # uvloop's clock is the loop iteration's cached millisecond.
        ahead = prepare_ahead(schedule, cap, clock is not None)
        slots = asyncio.Semaphore(cap)
        tasks: set[asyncio.Task] = set()
        failures: list[BaseException] = []

        async def send(req: PlannedRequest, scheduled_at: float, due: float) -> None:
            try:
                await one(http, req, scheduled_at, due)
            finally:
                slots.release()

        # The plan, its items and the imports are alive until the phase ends: frozen out of the
        # garbage collector's reach, its collections stop walking them (bench/open_loop_accuracy.py,
        # 15,000-request plan: send lag max 187 -> 19 ms, p99 17.6 -> 4.7 ms at 500/s here).
        gc.freeze()
        # the schedule starts `ahead` from now, so that its first arrivals are prepared in time too
        perf0, wall0 = time.perf_counter() + ahead, time.time() + ahead

        async def dispatch() -> None:
            for t, reqs in schedule:
                # timers are rounded to the millisecond: wait again if woken a little early
                while (wait := perf0 + t - ahead - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                for req in reqs:
                    await slots.acquire()  # the cap is reached: it goes when a slot frees, its lag recorded
                    task = loop.create_task(send(req, wall0 + t, perf0 + t))  # a pair: one instant
                    tasks.add(task)
                    task.add_done_callback(finished)

        dispatcher = loop.create_task(dispatch())

        def finished(t: asyncio.Task) -> None:
            tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and not failures:
                failures.append(t.exception())  # type: ignore[arg-type]
                dispatcher.cancel()  # stop sending; the failure is raised below

        try:
            try:
                await dispatcher
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not failures or (me is not None and me.cancelling()):
                    raise  # we were cancelled (e.g. the phase's stop event), not a send's failure
            while tasks and not failures:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
            if failures:
                raise failures[0]
        finally:  # a send failed (or we were cancelled): stop the others before the journal closes
            gc.unfreeze()
            dispatcher.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(dispatcher, *tasks, return_exceptions=True)

    try:
        async with contextlib.AsyncExitStack() as stack:
            if clock is not None:
                await stack.enter_async_context(clock)
            http = await stack.enter_async_context(new_session(cap, connect_timeout_s=min(10.0, wl.timeout_s), clock=clock))
            if progress:
                progress(result.recorded, result.planned, result.outcomes)
            if schedule is None:
                await closed_loop(http)
            else:
                await open_loop(http, schedule)
    finally:
        await journal.close()
    return result
