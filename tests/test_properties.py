"""Property-based tests (hypothesis): classification, the client's parsers, statistics, the plan.

Invariants, not examples: whatever a server sends, exactly one outcome class and a record that
can be written; every interval contains its estimate; every planned request id is unique and
each schema goes to each arm once per pass.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import stats_reference
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from synthetic_run import writable_record

from guided_ab.analysis import stats
from guided_ab.load.classify import classify
from guided_ab.load.client import RawResponse, _read_body, _StreamState
from guided_ab.plan import make_plan
from guided_ab.records import OUTCOMES
from guided_ab.selfcheck.scenarios import SCHEMAS
from guided_ab.workload import WorkItem

pytestmark = pytest.mark.timeout(120)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# what a server may put where a completion's fields go: right types, wrong types, nonsense
field_values = st.one_of(json_values, st.sampled_from(["stop", "length", "", "{}", '{"name": "ab", "age": 3}']))
texts = st.one_of(
    st.none(), st.text(max_size=60), json_values.map(json.dumps),
    st.sampled_from(['{"name": "ab", "age": 3}', '{"name": "ab"}', "[" * 3000, '{"a": ' * 3000, "\ud800", "null"]),
)
schemas = st.sampled_from([*SCHEMAS.values(), {}, {"type": "string"}, True])


# -- classification --------------------------------------------------------------------------------
@FAST
@given(
    failure=st.one_of(st.none(), st.sampled_from(["timeout", "connection_error", "protocol"]), st.text(max_size=10)),
    status=st.one_of(st.none(), st.integers(-1, 999)),
    text=texts,
    finish=st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls"]), st.text(max_size=10)),
    error=st.one_of(st.none(), st.text(max_size=40)),
    schema=schemas,
)
def test_classify_never_crashes_and_gives_exactly_one_class(failure, status, text, finish, error, schema):
    raw = RawResponse(sent_at=0.0, http_status=status, text=text, finish_reason=finish, failure=failure, error=error)
    outcome, message = classify(raw, schema if isinstance(schema, dict) else {})
    assert outcome in OUTCOMES
    assert (message is None) == (outcome == "success")
    if outcome == "success":
        assert status == 200 and failure not in ("timeout", "connection_error", "protocol")


@FAST
@given(text=texts, schema=schemas)
def test_success_means_the_answer_validates(text, schema):
    from jsonschema import Draft202012Validator

    schema = schema if isinstance(schema, dict) else {}
    raw = RawResponse(sent_at=0.0, http_status=200, text=text, finish_reason="stop")
    outcome, _ = classify(raw, schema)
    if outcome == "success":
        v = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        assert v.is_valid(json.loads(text))


# -- the client's parsers: any bytes from a server give a RawResponse a record can hold -------------
def _event(choices, usage) -> dict:
    return {"choices": choices, "usage": usage}


sse_events = st.one_of(
    st.binary(max_size=40).map(lambda b: b"data: " + b),
    st.text(max_size=40).map(lambda t: ("data: " + t).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: b"data: " + json.dumps(v).encode()),
    st.builds(
        _event,
        st.lists(st.fixed_dictionaries({}, optional={"delta": st.one_of(
            st.fixed_dictionaries({}, optional={"content": field_values, "role": field_values}), field_values),
            "finish_reason": field_values}), max_size=2) | field_values,
        st.one_of(st.none(), st.fixed_dictionaries({}, optional={"prompt_tokens": field_values,
                                                                    "completion_tokens": field_values}), field_values),
    ).map(lambda v: b"data: " + json.dumps(v).encode()),
    st.sampled_from([b"data: [DONE]", b"", b": keep-alive", b"event: x", b'data: {"error": "boom"}']),
)


@FAST
@given(lines=st.lists(sse_events, max_size=6), schema=schemas)
def test_any_event_stream_gives_one_class_and_a_writablewritable_record(lines, schema):
    out = RawResponse(sent_at=0.0, http_status=200)
    state = _StreamState(out)
    for i, line in enumerate(lines):
        if not state.feed(line, float(i), 0.0):
            break
    state.finish()
    outcome, error = classify(out, schema if isinstance(schema, dict) else {})
    assert outcome in OUTCOMES
    writable_record(out, outcome, error)


bodies = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda content, finish, usage: json.dumps(
            {"choices": [{"message": {"content": content}, "finish_reason": finish}], "usage": usage}).encode(),
        field_values, field_values, st.one_of(st.none(), st.fixed_dictionaries(
            {"prompt_tokens": field_values, "completion_tokens": field_values}), field_values),
    ),
    st.sampled_from([b'{"choices": [{"message": {"content": "\\ud800"}}]}', b"<html>502</html>"]),
)


@FAST
@given(body=bodies, schema=schemas)
def test_any_http_200_body_gives_one_class_and_a_writablewritable_record(body, schema):
    out = RawResponse(sent_at=0.0, http_status=200)
    _read_body(body, out)
    outcome, error = classify(out, schema if isinstance(schema, dict) else {})
    assert outcome in OUTCOMES
    writable_record(out, outcome, error)


# -- statistics: every interval contains its estimate ----------------------------------------------
def _inside(iv: stats.Interval, tol: float = 1e-9) -> bool:
    if iv.ci_low is None or iv.ci_high is None or iv.estimate is None:
        return True  # no interval claimed
    slack = tol * max(1.0, abs(iv.estimate))
    return iv.ci_low - slack <= iv.estimate <= iv.ci_high + slack


@FAST
@given(n=st.integers(1, 5000), data=st.data(), alpha=st.sampled_from([0.01, 0.05, 0.1]))
def test_wilson_interval_contains_the_estimate_within_0_1(n, data, alpha):
    x = data.draw(st.integers(0, n))
    iv = stats.wilson(x, n, alpha)
    assert 0.0 <= iv.ci_low and iv.ci_high <= 1.0
    # statsmodels' Wilson bounds can miss an estimate of exactly 0 or 1 by ~1e-17 (rounding):
    # e.g. wilson(0, 53, 0.01).ci_low == 1.4e-17, so Interval.contains(0.0) is False there
    assert _inside(iv, 1e-12)
    assert iv.estimate == x / n


cells = st.tuples(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))


@FAST
@given(c=cells, alpha=st.sampled_from([0.01, 0.05, 0.1]))
def test_paired_newcombe_interval_contains_the_difference(c, alpha):
    assume(sum(c) > 0)
    iv = stats.newcombe_diff_paired(*c, alpha=alpha)
    assert -1.0 <= iv.ci_low <= iv.ci_high <= 1.0
    assert _inside(iv)
    test = stats.mcnemar_test(*c)
    assert test.pvalue is None or 0.0 <= test.pvalue <= 1.0


@FAST
@given(x1=st.integers(0, 200), n1=st.integers(1, 200), x0=st.integers(0, 200), n0=st.integers(1, 200))
def test_independent_newcombe_interval_contains_the_difference(x1, n1, x0, n0):
    assume(x1 <= n1 and x0 <= n0)
    iv = stats_reference.newcombe_diff_independent(x1, n1, x0, n0)
    assert _inside(iv, 1e-7)


latencies = st.lists(st.floats(0.001, 600.0, allow_nan=False), min_size=1, max_size=80)


@SLOW
@given(x=latencies, seed=st.integers(0, 2**32 - 1))
def test_bootstrap_summary_intervals_contain_their_estimates(x, seed):
    s = stats_reference.bootstrap_summary(x, resamples=400, seed=seed)
    assert s.n == len(x)
    assert math.isclose(s.mean.estimate, float(np.mean(x)), rel_tol=1e-9)
    assert _inside(s.mean)
    assert _inside(s.quantiles["p50"])
    if s.cv.estimate is not None:
        assert s.cv.estimate >= 0


@SLOW
@given(pairs=st.lists(st.tuples(st.floats(0.01, 100.0), st.floats(0.01, 100.0)), min_size=2, max_size=60),
       seed=st.integers(0, 2**32 - 1))
def test_paired_ratio_intervals_contain_their_estimates(pairs, seed):
    a, b = (np.array(v) for v in zip(*pairs))
    ratios = stats_reference.paired_ratio_bootstrap(a, b, resamples=400, seed=seed)
    assert _inside(ratios["mean"], 1e-7)
    assert _inside(ratios["p50"], 1e-7)


@FAST
@given(p=st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), max_size=12))
def test_holm_adjusted_pvalues_are_bounded_and_not_smaller(p):
    adj = stats.holm(p)
    assert len(adj) == len(p)
    for raw, a in zip(p, adj):
        assert (raw is None) == (a is None)
        if raw is not None:
            assert raw - 1e-12 <= a <= 1.0


@FAST
@given(counts=st.lists(st.integers(0, 10_000), min_size=1, max_size=5))
def test_sample_ratio_pvalue_is_a_probability(counts):
    t = stats.sample_ratio_test(counts)
    assert t.pvalue is None or 0.0 <= t.pvalue <= 1.0


# -- the plan ------------------------------------------------------------------------------------
def _items(n: int) -> list[WorkItem]:
    return [WorkItem(schema_id=f"s{i}", subset="x", prompt="p", json_schema={}) for i in range(n)]


@FAST
@given(
    n_arms=st.integers(2, 5), n_items=st.integers(0, 25), repeats=st.integers(1, 4), warmup=st.integers(0, 3),
    share=st.sampled_from([0.0, 0.3, 0.5, 1.0]), seed=st.integers(0, 2**31),
)
def test_plan_ids_unique_and_each_schema_to_each_arm_once_per_pass(n_arms, n_items, repeats, warmup, share, seed):
    arms = [f"arm{i}" for i in range(n_arms)]
    items = _items(n_items)
    warm = [WorkItem(schema_id=f"w{i}", subset="warmup", prompt="", json_schema={}) for i in range(warmup)]
    plan = make_plan("ab", arms, items, seed=seed, warmup_items=warm, stream_share=share, repeats=repeats)
    reqs = plan.requests
    ids = [r.request_id for r in reqs]
    assert len(ids) == len(set(ids)) == n_arms * (n_items * repeats + warmup)
    assert [r.order_index for r in reqs] == list(range(len(reqs)))
    main = [r for r in reqs if not r.warmup]
    per = Counter((r.arm, r.schema_id) for r in main)
    assert set(per.values()) <= {repeats} and len(per) == n_arms * n_items
    # one pass = the first n_items pairs, the next n_items, ...: every schema once per arm in each
    by_pair: dict[int, list] = {}
    for r in main:
        by_pair.setdefault(r.pair_index, []).append(r)
    assert sorted(by_pair) == list(range(n_items * repeats))
    for k in range(repeats):
        pass_schemas = Counter(by_pair[p][0].schema_id for p in range(k * n_items, (k + 1) * n_items))
        assert pass_schemas == Counter({it.schema_id: 1 for it in items})
    for group in by_pair.values():  # a pair: every arm once, one schema, streamed alike
        assert sorted(r.arm for r in group) == sorted(arms)
        assert len({r.schema_id for r in group}) == 1 and len({r.stream for r in group}) == 1
    first = Counter((r.arm, r.schema_id) for r in reqs if r.first_for_schema)
    assert set(first.values()) <= {1} and len(first) == len({(r.arm, r.schema_id) for r in reqs})
    # the same seed gives the same plan (it is recorded, so a re-run can rebuild it)
    again = make_plan("ab", arms, items, seed=seed, warmup_items=warm, stream_share=share, repeats=repeats)
    assert again.requests == reqs
