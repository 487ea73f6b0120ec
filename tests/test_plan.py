from collections import Counter

from guided_ab.plan import make_plan
from guided_ab.workload import WorkItem


def items(n):
    return [WorkItem(schema_id=f"s{i}", subset="t", prompt="p", json_schema={"type": "object"}) for i in range(n)]


def test_every_schema_goes_to_every_arm_once_per_pass():
    plan = make_plan("ab", ["control", "cand"], items(10), seed=1, repeats=2)
    per_arm = Counter((r.arm, r.schema_id) for r in plan.requests)
    assert set(per_arm.values()) == {2}
    assert len(plan.requests) == 40
    assert len({r.request_id for r in plan.requests}) == 40  # idempotency keys are unique


def test_pairs_are_counterbalanced_abba():
    plan = make_plan("ab", ["a", "b"], items(40), seed=3)
    firsts = Counter(next(r.arm for r in plan.requests if r.pair_index == p) for p in range(40))
    assert firsts["a"] == firsts["b"] == 20  # each arm goes first in exactly half the pairs


def test_plan_is_reproducible_from_its_seed_and_differs_for_another():
    a = make_plan("ab", ["a", "b"], items(20), seed=7)
    b = make_plan("ab", ["a", "b"], items(20), seed=7)
    c = make_plan("ab", ["a", "b"], items(20), seed=8)
    assert a.requests == b.requests
    assert [r.schema_id for r in a.requests] != [r.schema_id for r in c.requests]


def test_warmups_first_and_flagged_and_first_for_schema_marks_compile_requests():
    warm = [WorkItem(schema_id="w0", subset="warmup", prompt="", json_schema={})]
    plan = make_plan("ab", ["a", "b"], items(3), seed=1, warmup_items=warm, repeats=2)
    assert [r.warmup for r in plan.requests[:2]] == [True, True]
    assert not any(r.warmup for r in plan.requests[2:])
    firsts = [r for r in plan.requests if not r.warmup and r.first_for_schema]
    assert len(firsts) == 6  # 3 schemas x 2 arms; the second pass is "repeated"
    assert max(r.order_index for r in firsts) < min(r.order_index for r in plan.requests if not r.warmup and not r.first_for_schema)


def test_pairs_stream_alike():
    plan = make_plan("ab", ["a", "b"], items(30), seed=2, stream_share=0.5)
    by_pair = {}
    for r in plan.requests:
        by_pair.setdefault(r.pair_index, set()).add(r.stream)
    assert all(len(v) == 1 for v in by_pair.values())
    assert 0 < sum(r.stream for r in plan.requests) < len(plan.requests)
