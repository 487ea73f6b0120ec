"""The request plan: which schema goes to which arm in which order, fixed by a recorded seed.

The A/B phase is paired: every schema goes to every arm. Arm order within a pair is
counterbalanced in ABBA blocks (for two arms: AB, BA, BA, AB, ...; for more arms a seeded
permutation per pair), so a drift in server or machine speed hits both arms alike. Warm-up
requests come first, one block per arm, and are flagged so statistics exclude them.
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


class Plan(BaseModel):
    phase: str
    seed: int
    arms: list[str]
    items: dict[str, WorkItem]  # schema_id -> item
    requests: list[PlannedRequest]


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
