"""The request plan: which schema goes to which arm in which order, fixed by a recorded seed.

The A/B phase is paired: every schema goes to every arm. Arm order within a pair is
counterbalanced in ABBA blocks (for two arms: AB, BA, BA, AB, ...; for more arms a seeded
permutation per pair), so a drift in server or machine speed hits both arms alike. Warm-up
requests come first, one block per arm, and are flagged so statistics exclude them.

A sequential A/B (config `decision.sequential`) grows its plan one look at a time
(`extend_plan`): each look adds pairs of new schemas first, then repeats of used ones; pair
indices and order indices continue, arm order stays counterbalanced, and request ids follow
from the plan so far and the seed, so a look re-made after a crash is the same look.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from guided_ab.workload import WorkItem


class PlannedRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    request_id: str  # idempotency key: "<phase>-<order_index>-<arm>"
    phase: str
    arm: str
    schema_id: str
    order_index: int
    pair_index: int
    warmup: bool
    first_for_schema: bool  # first planned request of this schema on this arm (grammar compile)
    stream: bool


class Look(BaseModel):
    """One look of a sequential A/B: the pairs (and requests) it added to the plan."""

    model_config = ConfigDict(frozen=True)

    look: int  # 1, 2, ...
    first_pair: int
    end_pair: int  # exclusive
    first_order: int  # order_index of its first request (its warm-ups included)
    end_order: int  # exclusive


class Plan(BaseModel):
    phase: str
    seed: int
    arms: list[str]
    items: dict[str, WorkItem]  # schema_id -> item
    requests: list[PlannedRequest]
    looks: list[Look] = []  # a sequential A/B's looks so far (empty: a fixed-size plan)

    @property
    def n_pairs(self) -> int:
        return 1 + max((r.pair_index for r in self.requests if not r.warmup), default=-1)

    def with_looks(self, looks: list[Look]) -> Plan:
        return self.model_copy(update={"looks": looks})


def _arm_orders(arms: list[str], n_pairs: int, rng: random.Random) -> list[list[str]]:
    if len(arms) == 2:
        a, b = arms
        start = rng.random() < 0.5
        abba = [[a, b], [b, a], [b, a], [a, b]] if start else [[b, a], [a, b], [a, b], [b, a]]
        return [abba[i % 4] for i in range(n_pairs)]
    orders = []
    for _ in range(n_pairs):
        perm = list(arms)
        rng.shuffle(perm)
        orders.append(perm)
    return orders


def make_plan(
    phase: str,
    arms: list[str],
    items: list[WorkItem],
    *,
    seed: int,
    warmup_items: Sequence[WorkItem] = (),
    stream_share: float = 1.0,
    repeats: int = 1,
) -> Plan:
    """Plan one phase: warm-ups per arm, then every item to every arm in counterbalanced order.

    With repeats > 1 the whole shuffled list is sent again (new pairs, same schemas) after the
    first pass, so first-request-per-schema and repeated-schema latency can be compared.
    """
    rng = random.Random(f"{seed}-{phase}")
    first_pass = list(items)
    rng.shuffle(first_pass)
    order = list(first_pass)
    for _ in range(repeats - 1):
        again = list(first_pass)
        rng.shuffle(again)
        order += again
    requests: list[PlannedRequest] = []
    seen: set[tuple[str, str]] = set()
    all_items = {it.schema_id: it for it in [*warmup_items, *order]}

    def pair_streams() -> bool:  # one draw per pair: both arms of a pair are sent alike
        return rng.random() < stream_share if 0 < stream_share < 1 else stream_share >= 1

    def add(arm: str, item: WorkItem, pair: int, warm: bool, stream: bool) -> None:
        i = len(requests)
        first = (arm, item.schema_id) not in seen
        seen.add((arm, item.schema_id))
        requests.append(
            PlannedRequest(
                request_id=f"{phase}-{i:06d}-{arm}", phase=phase, arm=arm, schema_id=item.schema_id,
                order_index=i, pair_index=pair, warmup=warm, first_for_schema=first, stream=stream,
            )
        )

    for w, item in enumerate(warmup_items):
        stream = pair_streams()
        for arm in arms:
            add(arm, item, -1 - w, True, stream)
    for pair, (item, arm_order) in enumerate(zip(order, _arm_orders(arms, len(order), rng))):
        stream = pair_streams()
        for arm in arm_order:
            add(arm, item, pair, False, stream)
    return Plan(phase=phase, seed=seed, arms=arms, items=all_items, requests=requests)


def next_look_items(plan: Plan, fresh: Sequence[WorkItem], n: int) -> list[WorkItem]:
    """The schemas of the next look's `n` pairs: unused ones from `fresh` (in its order) first,
    then repeats of the plan's schemas, the least-sent first (ties: earliest in the plan), so
    repeats spread evenly and stay clusters of one schema_id."""
    sent: dict[str, int] = {}
    for r in plan.requests:
        if not r.warmup:
            sent.setdefault(r.schema_id, 0)
            if r.arm == plan.arms[0]:
                sent[r.schema_id] += 1
    picked = [it for it in fresh if it.schema_id not in sent][:n]
    counts = {**sent, **{it.schema_id: 1 for it in picked}}
    if not counts:
        raise ValueError("no schema to send: the pool is empty")
    pool = {**{sid: plan.items[sid] for sid in sent}, **{it.schema_id: it for it in picked}}
    rank = {sid: i for i, sid in enumerate(pool)}
    while len(picked) < n:
        sid = min(counts, key=lambda s: (counts[s], rank[s]))
        counts[sid] += 1
        picked.append(pool[sid])
    return picked


def extend_plan(plan: Plan, items: Sequence[WorkItem], *, look: int, stream_share: float = 1.0,
                warmup_items: Sequence[WorkItem] = ()) -> Plan:
    """The plan with one more look: (optional warm-ups, e.g. after arms were restarted, then)
    one pair per item, in a seeded order, continuing the pair and order indices.

    With two arms the ABBA pattern continues from the plan's first pair (as make_plan lays it
    out); with more, a seeded permutation per pair. Everything follows from the plan so far, the
    seed and the look number: re-made after a crash, the look is the same.
    """
    rng = random.Random(f"{plan.seed}-{plan.phase}-look-{look}")
    order = list(items)
    rng.shuffle(order)
    requests = list(plan.requests)
    seen = {(r.arm, r.schema_id) for r in requests}
    all_items = dict(plan.items)
    first_order, first_pair = len(requests), plan.n_pairs
    n_warm = sum(1 for r in requests if r.warmup and r.arm == plan.arms[0])

    def pair_streams() -> bool:
        return rng.random() < stream_share if 0 < stream_share < 1 else stream_share >= 1

    def add(arm: str, item: WorkItem, pair: int, warm: bool, stream: bool) -> None:
        i = len(requests)
        first = (arm, item.schema_id) not in seen
        seen.add((arm, item.schema_id))
        all_items.setdefault(item.schema_id, item)
        requests.append(PlannedRequest(
            request_id=f"{plan.phase}-{i:06d}-{arm}", phase=plan.phase, arm=arm, schema_id=item.schema_id,
            order_index=i, pair_index=pair, warmup=warm, first_for_schema=first, stream=stream,
        ))

    for w, item in enumerate(warmup_items):
        item = item.model_copy(update={"schema_id": f"warmup-{n_warm + w}"})
        stream = pair_streams()
        for arm in plan.arms:
            add(arm, item, -1 - n_warm - w, True, stream)
    if len(plan.arms) == 2:
        head = [r.arm for r in plan.requests if r.pair_index == 0 and not r.warmup] or list(plan.arms)
        abba = [head, head[::-1], head[::-1], head]
        arm_orders = [abba[(first_pair + k) % 4] for k in range(len(order))]
    else:
        arm_orders = _arm_orders(plan.arms, len(order), rng)
    for k, (item, arm_order) in enumerate(zip(order, arm_orders)):
        stream = pair_streams()
        for arm in arm_order:
            add(arm, item, first_pair + k, False, stream)
    new_look = Look(look=look, first_pair=first_pair, end_pair=first_pair + len(order),
                    first_order=first_order, end_order=len(requests))
    return Plan(phase=plan.phase, seed=plan.seed, arms=plan.arms, items=all_items, requests=requests,
                looks=[*plan.looks, new_look])


def first_look(phase: str, arms: list[str], items: list[WorkItem], *, seed: int,
               warmup_items: Sequence[WorkItem] = (), stream_share: float = 1.0) -> Plan:
    """Look 1 of a sequential plan: make_plan's plan of its items, marked as a look."""
    plan = make_plan(phase, arms, items, seed=seed, warmup_items=warmup_items, stream_share=stream_share)
    return plan.with_looks([Look(look=1, first_pair=0, end_pair=plan.n_pairs, first_order=0, end_order=len(plan.requests))])
