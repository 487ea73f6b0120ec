"""Open-loop load profiles (workload.load: constant / poisson) against the loopback server, no vLLM.

Arrivals keep their own clock (never the answers'), both arms of a pair share their instant, a
request the in-flight cap held back is sent late and recorded with its lag (never re-scheduled),
a resumed phase keeps one record per request and its remaining schedule, and bad profiles are
config errors naming the field. The schedule's accuracy at 500 requests/s is
bench/open_loop_accuracy.py.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml
from loopback_run import loopback_run
from scipy import stats

from guided_ab.config import ConfigError, LoadProfile, Workload, parse_config
from guided_ab.load.arrivals import arrival_times, arrivals_within, planned_pairs, schedule_seed
from guided_ab.load.runner import open_loop_schedule, run_plan
from guided_ab.load.send_clock import loop_runner
from guided_ab.plan import extend_plan, first_look, make_plan
from guided_ab.store import RunStore
from guided_ab.workload import WorkItem

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object"}
GOOD = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())


def _configure(url: str, delay_ms: float, tokens: int) -> None:
    import json
    import urllib.request

    req = urllib.request.Request(url + "/bench/config", method="POST", data=json.dumps(
        {"token_delay_ms": delay_ms, "tokens": tokens, "program": []}).encode())
    urllib.request.urlopen(req, timeout=10).close()


def _run(coro):
    """As the product runs an open-loop phase (guided_ab.phases.run_requests): on asyncio's own
    loop, timed by the send clock."""
    return loop_runner(open_loop=True)(coro)


def _items(n: int) -> list[WorkItem]:
    return [WorkItem(schema_id=f"s{i:03d}", subset="t", prompt=f"request {i}", json_schema=SCHEMA) for i in range(n)]


def _setup(url: str, root: Path, arms=("a", "b")):
    return loopback_run(url, root, "open-loop", arms)


WL = Workload(max_tokens=8, timeout_s=30, seed=11)


# -- the schedules ------------------------------------------------------------------------------
def test_constant_schedule_is_evenly_spaced():
    assert arrival_times("constant", 4.0, 5, seed=1) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_poisson_schedule_is_seeded_exponential_at_the_rate():
    a = arrival_times("poisson", 50.0, 20_000, seed=[7, 1, 0])
    assert a == arrival_times("poisson", 50.0, 20_000, seed=[7, 1, 0])  # a resumed phase reproduces it
    assert a[:100] == arrival_times("poisson", 50.0, 100, seed=[7, 1, 0])  # a longer one extends a shorter one
    assert a != arrival_times("poisson", 50.0, 20_000, seed=[7, 1, 1])
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert abs(len(gaps) / a[-1] / 50.0 - 1) < 0.03
    assert stats.kstest(gaps, "expon", args=(0, 1 / 50.0)).pvalue > 0.001
    within = arrivals_within("poisson", 50.0, 10.0, seed=[7, 1, 0])
    assert within == [t for t in a if t < 10.0]


def test_a_count_or_a_duration_sizes_the_phase():
    assert planned_pairs(LoadProfile(profile="poisson", rate=2, max_in_flight=4, count=7), 1, "ab") == 7
    by_time = LoadProfile(profile="constant", rate=2, max_in_flight=4, duration_s=10)
    assert planned_pairs(by_time, 1, "ab") == 20  # 0, 0.5, ..., 9.5 s
    assert planned_pairs(LoadProfile(), 1, "ab") is None  # closed: the plan's own size


def test_an_open_loop_plan_sends_the_registered_pairs(tmp_path):
    from guided_ab.phases import build_plans

    data = copy.deepcopy(GOOD)
    data["workload"].update(size=4, warmup=1, load={"ab": {"profile": "poisson", "rate": 3, "max_in_flight": 4, "count": 10}})
    cfg = parse_config(data)
    store = RunStore(tmp_path, "sized")
    plan = build_plans(cfg, store)["ab"]
    measured = [r for r in plan.requests if not r.warmup]
    assert sorted({r.pair_index for r in measured}) == list(range(10))  # 10 pairs cycling the 4 schemas
    assert len({r.schema_id for r in measured}) == 4
    assert all(sum(r.pair_index == p for r in measured) == 2 for p in range(10))  # both arms, every pair


def test_the_dry_run_says_what_the_profile_sends():
    from guided_ab.dry_run import describe_plan

    data = copy.deepcopy(GOOD)
    data["workload"].update(size=4, warmup=1, load={"ab": {"profile": "constant", "rate": 2, "max_in_flight": 6, "duration_s": 30}})
    text = describe_plan(parse_config(data), run_id="r")
    assert "ab load: open loop, evenly spaced arrivals at 2/s per arm" in text
    assert "60 pairs (the schedule's arrivals in 30 s)" in text and "at most 6 in flight" in text
    assert "observe load: closed loop" in text


def test_the_phase_time_limit_covers_the_schedule():
    from guided_ab.limits import limits

    data = copy.deepcopy(GOOD)  # 2000 pairs at 0.5/s: the schedule alone lasts ~4000 s
    data["workload"].update(size=4, load={"ab": {"profile": "poisson", "rate": 0.5, "max_in_flight": 8, "count": 2000}})
    assert limits(parse_config(data)).ab_s > 4000


# -- the runner ---------------------------------------------------------------------------------
def test_arrivals_follow_the_schedule(loopback, tmp_path):
    _configure(loopback, 0, 8)
    plan = make_plan("ab", ["a"], _items(10), seed=3)
    store, endpoints = _setup(loopback, tmp_path, arms=("a",))
    load = LoadProfile(profile="constant", rate=20, max_in_flight=8, count=10)
    _run(run_plan(plan, endpoints, store, WL, load=load))
    recs = sorted(store.journal("ab"), key=lambda r: r.scheduled_at)
    assert len(recs) == 10
    due = [r.scheduled_at - recs[0].scheduled_at for r in recs]
    assert due == pytest.approx([i / 20 for i in range(10)], abs=1e-6)  # the schedule, never shifted
    for r in recs:
        assert r.send_lag_s == pytest.approx(r.sent_at - r.scheduled_at)
        assert r.send_lag_s > -0.002  # never sent before its time
    sent = [r.sent_at for r in recs]
    assert sent[-1] - sent[0] > 0.4  # spread over the schedule (9 gaps of 50 ms), not all at once


def test_lag_is_recorded_when_the_cap_blocks(loopback, tmp_path):
    _configure(loopback, 30, 8)  # ~240 ms per answer (8 tokens x 30 ms), arrivals every 50 ms, one in flight
    plan = make_plan("ab", ["a"], _items(5), seed=3)
    store, endpoints = _setup(loopback, tmp_path, arms=("a",))
    load = LoadProfile(profile="constant", rate=20, max_in_flight=1, count=5)
    _run(run_plan(plan, endpoints, store, WL, load=load))
    recs = sorted(store.journal("ab"), key=lambda r: r.scheduled_at)
    assert [r.outcome for r in recs] == ["success"] * 5
    due = [r.scheduled_at - recs[0].scheduled_at for r in recs]
    assert due == pytest.approx([0, 0.05, 0.1, 0.15, 0.2], abs=1e-6)  # kept: the lag is recorded, not hidden
    for before, after in zip(recs, recs[1:]):  # the cap: the next went out only once the last had ended
        assert after.sent_at >= before.sent_at + before.latency_s - 0.005
    assert recs[-1].send_lag_s > 0.5  # 4 answers of >= 240 ms ahead of it, due 200 ms after the first
    assert recs[-1].send_lag_s == pytest.approx(recs[-1].sent_at - recs[-1].scheduled_at)


def test_both_arms_of_a_pair_share_their_instant(loopback, tmp_path):
    _configure(loopback, 0, 8)
    plan = make_plan("ab", ["a", "b"], _items(6), seed=3, warmup_items=_items(1))
    store, endpoints = _setup(loopback, tmp_path)
    load = LoadProfile(profile="poisson", rate=25, max_in_flight=8, count=6)
    _run(run_plan(plan, endpoints, store, WL, load=load))
    recs = store.journal("ab")
    assert len(recs) == len(plan.requests) == 14
    by_pair: dict[int, set[float]] = {}
    for r in recs:
        by_pair.setdefault(r.pair_index, set()).add(r.scheduled_at)
    assert all(len(v) == 1 for v in by_pair.values())  # one instant per pair
    order = list(dict.fromkeys(r.pair_index for r in plan.requests))  # the warm-up pair first
    times = [by_pair[p].pop() for p in order]
    expected = arrival_times("poisson", 25, len(order), schedule_seed(WL.seed, "ab"))
    assert [t - times[0] for t in times] == pytest.approx(expected, abs=1e-6)


def test_a_resumed_phase_keeps_one_record_per_request_and_its_schedule(loopback, tmp_path):
    _configure(loopback, 0, 8)
    plan = make_plan("ab", ["a"], _items(10), seed=3)
    store, endpoints = _setup(loopback, tmp_path, arms=("a",))
    load = LoadProfile(profile="constant", rate=10, max_in_flight=4, count=10)

    async def stopped_after(k: int) -> None:  # a phase killed mid-way: once k answers are recorded
        task = asyncio.ensure_future(run_plan(plan, endpoints, store, WL, load=load))
        while not task.done() and len(store.journal("ab")) < k:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    _run(stopped_after(3))
    first = {r.request_id for r in store.journal("ab")}
    assert 3 <= len(first) < 10
    result = _run(run_plan(plan, endpoints, store, WL, load=load))
    recs = store.journal("ab")
    ids = [r.request_id for r in recs]
    assert sorted(ids) == sorted(r.request_id for r in plan.requests)  # every request, exactly once
    assert result.sent_now == 10 - len(first)
    resumed = sorted((r for r in recs if r.request_id not in first), key=lambda r: r.order_index)
    due = [r.scheduled_at - resumed[0].scheduled_at for r in resumed]
    # their original spacing (0.1 s per arrival), relative to the new start
    assert due == pytest.approx([(r.order_index - resumed[0].order_index) / 10 for r in resumed], abs=1e-6)


def test_each_look_of_a_sequential_ab_has_its_own_schedule():
    items = _items(12)
    plan = first_look("ab", ["a", "b"], items[:4], seed=5)
    plan = extend_plan(plan, items[4:10], look=2)
    load = LoadProfile(profile="poisson", rate=4, max_in_flight=4)
    look2 = [r for r in plan.requests if r.order_index >= plan.looks[1].first_order]
    sched = open_loop_schedule(plan, look2, load, seed=5)  # what a run of look 2 sends
    assert [len(rs) for _, rs in sched] == [2] * 6  # one arrival per pair, both arms
    expected = arrival_times("poisson", 4, 6, schedule_seed(5, "ab", 2))
    assert [t for t, _ in sched] == pytest.approx(expected)


# -- bad profiles -------------------------------------------------------------------------------
def _with_load(ab: dict, **workload) -> dict:
    data = copy.deepcopy(GOOD)
    data["workload"].update(load={"ab": ab}, **workload)
    return data


@pytest.mark.parametrize("data, words", [
    (_with_load({"profile": "poisson", "rate": 0, "max_in_flight": 4, "count": 5}), ["workload.load.ab.rate", "> 0"]),
    (_with_load({"profile": "constant", "rate": -2, "max_in_flight": 4, "count": 5}), ["workload.load.ab.rate", "> 0"]),
    (_with_load({"profile": "poisson", "rate": 2, "duration_s": 60}), ["max_in_flight", "cap"]),
    (_with_load({"profile": "closed", "rate": 2}), ["rate", "only for an open loop"]),
    (_with_load({"profile": "poisson", "max_in_flight": 4, "count": 5}), ["rate", "required"]),
    (_with_load({"profile": "poisson", "rate": 2, "max_in_flight": 4}), ["workload.load.ab", "count", "duration_s"]),
    (_with_load({"profile": "poisson", "rate": 2, "max_in_flight": 4, "count": 5, "duration_s": 9}), ["count and duration_s"]),
    (_with_load({"profile": "poisson", "rate": 2, "max_in_flight": 4, "count": 5}, repeats=2), ["workload.repeats"]),
    (_with_load({"profile": "burst", "rate": 2, "max_in_flight": 4, "count": 5}), ["workload.load.ab.profile", "burst"]),
    (_with_load({"profile": "poisson", "rate": 2, "max_in_flight": 4, "duration_s": 0}), ["duration_s", "> 0"]),
])
def test_bad_profiles_are_rejected_naming_the_field(data, words):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_sequential_ab_takes_an_open_loop_per_look_not_a_count():
    data = _with_load({"profile": "poisson", "rate": 2, "max_in_flight": 4, "count": 5})
    data["decision"] = {"sequential": {"pairs_per_look": 8, "max_pairs": 32}}
    with pytest.raises(ConfigError, match="pairs_per_look"):
        parse_config(data)
    data["workload"]["load"]["ab"].pop("count")
    assert parse_config(data).workload.load.ab.profile == "poisson"  # each look: its own schedule at the rate


def test_a_modal_arm_must_take_what_is_in_flight():
    data = _with_load({"profile": "poisson", "rate": 20, "max_in_flight": 64, "count": 50})
    for arm in data["arms"]:
        arm.update(target="modal", modal={"max_concurrent_inputs": 8}, server_args=[])
    with pytest.raises(ConfigError, match="max_concurrent_inputs"):
        parse_config(data)
