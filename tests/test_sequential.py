"""Sequential, budget-capped A/B and `continue` (issue 14): the rule on synthetic records (a clear
effect switches, a clear null keeps by futility, repeats of a schema are one unit, timeouts are
censored), the plan growing look by look, and whole runs against the loopback fault server
(external arms, no vLLM): a run stops within its caps with one record per request, a run killed
mid-look resumes with no duplicate and no lost record, `continue` extends a fixed-size run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from guided_ab import looks, phases
from guided_ab.analysis import groupseq as G
from guided_ab.analysis import sequential as Q
from guided_ab.analysis.simulate import synthetic_records
from guided_ab.config import ConfigError, DecisionRule, parse_config
from guided_ab.plan import extend_plan, first_look, next_look_items
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore
from guided_ab.workload import WorkItem

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-sequential-0123456789"
DESIGN = Q.Design(planned_pairs=400, pairs_per_look=20, max_pairs=400, max_usd=None, min_latency_gain=0.05, min_success_gain=0.02)


def _looks(n_looks: int, per: int = 20) -> list[tuple[int, int]]:
    return [(k, per * k) for k in range(1, n_looks + 1)]


# -- the rule on synthetic records ----------------------------------------------------------------
def test_a_clear_speedup_switches_at_an_early_look():
    df = synthetic_records(400, ratio=0.6, success_corr=1.0, seed=3)  # same successes, 40 % faster
    judged = Q.replay(df, "control", ["candidate"], DecisionRule(), DESIGN, 120.0, _looks(20))
    # faster from look 1; the success guardrail (5 points) needs ~70 agreeing schemas (sd floor)
    assert judged[-1]["verdict"] == "switch" and len(judged) <= 5, Q.look_rows(judged)
    assert judged[0]["per_candidate"]["candidate"]["latency_ratio"]["ci_high"] < 1
    d = Q.decision(judged, control="control", candidates=["candidate"], rule=DecisionRule(), design=DESIGN,
                   stopped_because=None, spend_usd=0.0)
    assert d["verdict"] == "switch" and d["serve"] == "candidate"
    assert d["sequential"]["stopped_because"] == "settled" and d["sequential"]["settled_at_look"] == len(judged)
    assert {c["name"] for c in d["criteria"]} >= {"success_noninferiority", "latency_noninferiority", "latency_superiority"}


def test_a_clear_null_keeps_by_futility_with_a_large_cap():
    df = synthetic_records(400, ratio=1.0, sigma=0.1, p_control=1.0, p_candidate=1.0, seed=4)
    judged = Q.replay(df, "control", ["candidate"], DecisionRule(), DESIGN, 120.0, _looks(20))
    last = judged[-1]
    assert last["verdict"] == "keep" and last["per_candidate"]["candidate"]["why"] == "futility", Q.look_rows(judged)
    assert last["pairs"] < 400  # settled before the cap (~170 agreeing schemas exclude a 2-point gain)
    d = Q.decision(judged, control="control", candidates=["candidate"], rule=DecisionRule(), design=DESIGN,
                   stopped_because=None, spend_usd=0.0)
    assert d["verdict"] == "keep" and d["serve"] == "control" and "futility" in d["reasons"][0]


def test_a_clearly_slower_candidate_is_kept_on_its_guardrail():
    df = synthetic_records(200, ratio=1.6, success_corr=1.0, seed=5)
    last = Q.replay(df, "control", ["candidate"], DecisionRule(), DESIGN, 120.0, _looks(10))[-1]
    assert last["verdict"] == "keep" and last["per_candidate"]["candidate"]["why"] == "guardrail"


def test_the_cap_is_inconclusive_and_says_what_it_bought():
    df = synthetic_records(40, ratio=1.0, seed=6)
    judged = Q.replay(df, "control", ["candidate"], DecisionRule(), DESIGN, 120.0, _looks(2))
    d = Q.decision(judged, control="control", candidates=["candidate"], rule=DecisionRule(), design=DESIGN,
                   stopped_because="cap", spend_usd=1.5)
    assert d["verdict"] == "inconclusive" and d["sequential"]["stopped_because"] == "cap"
    assert any("the cap" in r and "40 pairs" in r and "±" in r for r in d["reasons"]), d["reasons"]
    assert d["sequential"]["method"].startswith("group-sequential repeated confidence intervals")


def test_repeats_of_a_schema_count_once():
    base = synthetic_records(30, ratio=0.9, seed=7)
    ab = base[(base["phase"] == "ab") & ~base["warmup"].astype(bool)]
    # every pair sent twice more, identically (temperature 0): new pair indices, the same schema
    n = int(ab["pair_index"].max()) + 1
    repeats = [ab.assign(pair_index=ab["pair_index"] + k * n, request_id=ab["request_id"] + f"-r{k}") for k in (1, 2)]
    tripled = pd.concat([ab, *repeats], ignore_index=True)
    once = Q.schema_units(ab, "control", "candidate", 120.0)
    thrice = Q.schema_units(tripled, "control", "candidate", 120.0)
    assert len(once) == len(thrice) == 30  # units are schemas, not pairs
    assert thrice["pairs"].eq(3).all()
    assert np.allclose(once["log_ratio"], thrice["log_ratio"]) and np.allclose(once["success_diff"], thrice["success_diff"])
    j1 = Q.judge_candidate(once, "candidate", DecisionRule(), DESIGN, 2.5)
    j3 = Q.judge_candidate(thrice, "candidate", DecisionRule(), DESIGN, 2.5)
    assert j1["units"] == j3["units"] == 30
    assert j1["latency_ratio"] == pytest.approx(j3["latency_ratio"]) and j1["success_diff"] == pytest.approx(j3["success_diff"])
    # and the interval is the repeated confidence interval of the schema means: c x their SE
    lr = thrice["log_ratio"].to_numpy()
    assert j3["latency_ratio"]["ci_high"] == pytest.approx(np.exp(lr.mean() + G.half_width(lr.std(ddof=1), 30, 2.5)))
    assert G.half_width(1.0, 30, 2.5) > 2.5 / np.sqrt(30)  # Student's t at 29 df: wider than the normal


def test_agreeing_schemas_never_give_a_zero_width_success_interval():
    d = np.zeros(10)  # every schema: both arms succeeded (or both failed)
    est, lo, hi = Q.success_interval(d, 2.5)
    assert est == 0 and lo < -0.2 and hi > 0.2  # 10 schemas cannot exclude a 5-point difference
    assert Q.mean_interval(d, 2.5)[1:] == (0.0, 0.0)  # what the unfloored interval would claim
    assert Q.success_interval(np.zeros(200), 2.5)[2] < 0.02


def test_boundaries_match_published_ones_and_spend_alpha_as_designed():
    from scipy.stats import norm

    # ldbounds (R), two-sided alpha 0.05, O'Brien-Fleming-type spending, 5 equally spaced looks
    obf = lambda t, a: 4 - 4 * norm.cdf(norm.ppf(1 - a / 4) / np.sqrt(t))  # noqa: E731
    assert G.critical_values([0.2, 0.4, 0.6, 0.8, 1.0], 0.05, obf) == pytest.approx([4.8769, 3.3569, 2.6803, 2.2898, 2.0310], abs=2e-3)
    # and the spending function this rule uses, checked by simulating the null: P(ever outside) = alpha spent
    ts = [k / 10 for k in range(1, 11)] + [1.5, 2.0]
    c = np.array(G.critical_values(ts, 0.05))
    rng = np.random.default_rng(0)
    steps = np.diff([0.0, *ts])
    b = np.cumsum(rng.standard_normal((200_000, len(ts))) * np.sqrt(steps), axis=1)
    out = np.abs(b / np.sqrt(ts)) >= c
    planned = out[:, :10].any(axis=1).mean()
    assert planned == pytest.approx(G.spent(1.0, 0.05), abs=0.0015)  # 0.045: the reserve is kept
    assert out.any(axis=1).mean() == pytest.approx(G.spent(2.0, 0.05), abs=0.0015)  # a continuation spends it
    assert all(x > y for x, y in zip(c[:9], c[1:10]))  # narrower as pairs arrive


def test_timeouts_are_censored_at_the_timeout_never_dropped_and_fast_failures_say_nothing_of_speed():
    rows = []
    cand = {0: (None, "timeout"), 1: (None, "timeout"), 2: (None, "timeout"), 3: (0.01, "rejected"), 4: (0.05, "server_error")}
    for p in range(10):
        lat, outcome = cand.get(p, (1.0, "success"))
        for arm, la, out in (("control", 1.0, "success"), ("cand", lat, outcome)):
            rows.append({"phase": "ab", "warmup": False, "arm": arm, "pair_index": p, "schema_id": f"s{p}", "attempt": 1,
                         "sent_at": float(p), "latency_s": la, "outcome": out})
    units = Q.schema_units(pd.DataFrame(rows), "control", "cand", timeout_s=30.0).sort_values("schema_id")
    assert len(units) == 10 and units["censored"].sum() == 3
    assert units["log_ratio"].head(3).tolist() == pytest.approx([np.log(30.0)] * 3)
    # a 10 ms refusal is not a 100x speed-up: left out of latency, counted as a failure in success
    assert units["log_ratio"].iloc[3:5].isna().all() and units["success_diff"].iloc[3:5].tolist() == [-1.0, -1.0]


# -- the plan, look by look -----------------------------------------------------------------------
def _items(prefix: str, n: int) -> list[WorkItem]:
    return [WorkItem(schema_id=f"{prefix}{i}", subset="t", prompt="p", json_schema={"type": "object"}) for i in range(n)]


def test_the_plan_grows_new_schemas_first_then_repeats_with_continuing_indices():
    warm = _items("w", 1)
    plan = first_look("ab", ["a", "b"], _items("s", 8), seed=5, warmup_items=warm)
    fresh = _items("s", 12)  # 4 unused left, then repeats
    for look in (2, 3):
        items = next_look_items(plan, fresh, 8)
        plan = extend_plan(plan, items, look=look)
    assert [(lk.first_pair, lk.end_pair) for lk in plan.looks] == [(0, 8), (8, 16), (16, 24)]
    ids = [r.request_id for r in plan.requests]
    assert len(ids) == len(set(ids)) and [r.order_index for r in plan.requests] == list(range(len(ids)))
    per_schema = Counter(r.schema_id for r in plan.requests if not r.warmup and r.arm == "a")
    assert set(per_schema) == {f"s{i}" for i in range(12)} and sum(per_schema.values()) == 24
    assert max(per_schema.values()) - min(per_schema.values()) <= 1  # repeats spread evenly
    look2 = {r.schema_id for r in plan.requests if 8 <= r.pair_index < 16}
    assert {"s8", "s9", "s10", "s11"} <= look2  # unused schemas before any repeat
    firsts = Counter(next(r.arm for r in plan.requests if r.pair_index == p) for p in range(24))
    assert firsts["a"] == firsts["b"] == 12  # ABBA continues across looks
    again = first_look("ab", ["a", "b"], _items("s", 8), seed=5, warmup_items=warm)
    for look in (2, 3):
        again = extend_plan(again, next_look_items(again, fresh, 8), look=look)
    assert again.requests == plan.requests  # re-made after a crash: the same looks, the same ids


def test_sequential_config_errors_name_the_field():
    arms = [{"name": "a", "role": "control", "backend": "guidance"}, {"name": "b", "role": "candidate", "backend": "auto"}]
    with pytest.raises(ConfigError, match=r"decision\.sequential\.max_usd"):
        parse_config({"name": "x", "arms": arms, "decision": {"sequential": {"max_usd": -1}}})
    with pytest.raises(ConfigError, match=r"decision\.sequential.*pairs_per_look"):
        parse_config({"name": "x", "arms": arms, "decision": {"sequential": {"pairs_per_look": 50, "max_pairs": 10}}})


# -- whole runs against the loopback fault server --------------------------------------------------
def _config(root: Path, control_url: str, cand_url: str, *, sequential: dict | None = None, size: int = 20,
            cost_per_hour: float = 0.0, delay_warm: int = 1, **rule) -> dict:
    arm = {"target": "external", "api_key_env": "SEQ_TEST_KEY", "model": "guided-ab-model", "cost_per_hour": cost_per_hour}
    return {
        "name": "seq", "store": str(root), "phases": ["deploy", "ab"],
        "arms": [{"name": "control", "role": "control", "backend": "guidance", "url": control_url, **arm},
                 {"name": "cand", "role": "candidate", "backend": "auto", "url": cand_url, **arm}],
        "workload": {"size": size, "observe_size": 0, "warmup": delay_warm, "concurrency": 4, "timeout_s": 20},
        "decision": {"bootstrap_resamples": 200, **rule, **({"sequential": sequential} if sequential else {})},
    }


def _run(cfg_data: dict, run_id: str) -> RunStore:
    """The experiment's phases without Prefect: plans, deploy, the looks, teardown, evaluate, decide."""
    cfg = parse_config(cfg_data)
    store = RunStore.create(cfg, run_id)
    phases.build_plans(cfg, store)
    phases.start_endpoints(cfg, store, log=lambda m: None)
    looks.run_sequential_ab(cfg, store, log=lambda m: None)
    phases.teardown(store, log=lambda m: None)
    phases.evaluate_run(store)
    phases.decide_run(store)
    return store


def _exactly_once(store: RunStore) -> None:
    plan = phases.build_plans(store.load_config(), store)["ab"]
    records = store.journal("ab")
    ids = [r.request_id for r in records]
    assert Counter(ids).most_common(1)[0][1] == 1, "a request was recorded twice"
    assert sorted(ids) == sorted(r.request_id for r in plan.requests), "every planned request has its one record"
    sent = store.sent_counts("ab")
    assert set(sent) == set(ids)
    assert all(r.attempt == sent[r.request_id] for r in records)  # re-sent only when unrecorded
    gates = {g["name"]: g["passed"] for g in store.read_json("evaluation.json")["gates"]}
    assert all(gates.values()), gates


@pytest.fixture()
def key_env(monkeypatch):
    monkeypatch.setenv("SEQ_TEST_KEY", KEY)


def test_sequential_runs_stop_within_their_caps_with_one_record_per_request(tmp_path, key_env):
    with FaultServer("healthy", api_key=KEY, delay_s=0.12) as slow, FaultServer("healthy", api_key=KEY, delay_s=0.04) as fast:
        t0 = time.monotonic()
        # 20 agreeing schemas bound the success difference to ~±0.2: a 25-point margin is met at look 1
        faster = _run(_config(tmp_path / "runs", slow.url, fast.url, success_margin=0.25,
                              sequential={"pairs_per_look": 20, "max_pairs": 60}), "faster")
        took = time.monotonic() - t0
        # a null candidate with no futility margin: only the cap stops it
        capped = _run(_config(tmp_path / "runs", fast.url, fast.url, sequential={
            "pairs_per_look": 10, "max_pairs": 30, "min_latency_gain": 0.0, "min_success_gain": 0.0}), "capped")
        # max_usd: 3600 USD/h per arm = 2 USD per second of sending
        spent = _run(_config(tmp_path / "runs", fast.url, fast.url, cost_per_hour=3600.0, sequential={
            "pairs_per_look": 10, "max_pairs": 200, "max_usd": 1.0, "min_latency_gain": 0.0, "min_success_gain": 0.0}), "usd")
    d = faster.read_json("decision.json")
    assert d["verdict"] == "switch" and d["serve"] == "cand", d["reasons"]
    assert d["sequential"]["stopped_because"] == "settled" and d["sequential"]["pairs_used"] <= 60
    assert d["sequential"]["looks"][-1]["per_candidate"]["cand"]["latency_ratio"]["ci_high"] < 1
    assert faster.read_json("sequential.json")["stopped_because"] == "settled"
    print(f"sequential run to a switch: {d['sequential']['pairs_used']} pairs in {took:.1f} s")

    d = capped.read_json("decision.json")
    assert d["verdict"] == "inconclusive" and d["sequential"]["stopped_because"] == "cap", d["reasons"]
    assert d["sequential"]["pairs_used"] == 30 and len(d["sequential"]["looks"]) == 3
    assert any("the cap (30 pairs)" in r for r in d["reasons"])

    d = spent.read_json("decision.json")
    assert d["sequential"]["stopped_because"] == "cap" and d["sequential"]["pairs_used"] < 200
    assert 0 < d["sequential"]["cap"]["spend_usd"]
    for store in (faster, capped, spent):
        _exactly_once(store)


def test_a_sequential_run_killed_mid_look_resumes_exactly_once(tmp_path, key_env):
    server = FaultServer("healthy", api_key=KEY, delay_s=0.25)
    server.start()
    root = tmp_path / "runs"
    try:
        cfg = parse_config(_config(root, server.url, server.url, size=12, sequential={
            "pairs_per_look": 12, "max_pairs": 36, "min_latency_gain": 0.0, "min_success_gain": 0.0}))
        store = RunStore.create(cfg, "killed")
        phases.build_plans(cfg, store)
        phases.start_endpoints(cfg, store, log=lambda m: None)
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
        cmd = [sys.executable, "-m", "guided_ab.cli", "ab", "--run-id", "killed", "--store", str(root)]
        first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        look1 = 2 + 24  # warm-ups + 12 pairs
        deadline = time.monotonic() + 240
        while len(store.journal("ab")) < look1 + 6 and time.monotonic() < deadline:
            assert first.poll() is None, "the A/B ended before it could be killed"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the flow process and its ephemeral Prefect server
        first.wait(10)
        plan = phases.build_plans(cfg, store)["ab"]
        assert len(plan.looks) == 2 and len(looks.state(store)["looks"]) == 1, "killed mid-look 2"
        assert len(store.journal("ab")) < len(plan.requests)

        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    finally:
        server.stop()
    state = looks.state(store)
    assert [lk["look"] for lk in state["looks"]] == [1, 2, 3] and state["stopped_because"] == "cap"
    phases.evaluate_run(store)
    decision = phases.decide_run(store)
    assert decision["sequential"]["pairs_used"] == 36
    _exactly_once(store)


def _cli(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guided_ab.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_continue_extends_a_finished_inconclusive_fixed_size_run(tmp_path, key_env):
    root = tmp_path / "runs"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    with FaultServer("healthy", api_key=KEY, delay_s=0.03) as srv:
        # 6 pairs and zero margins: no fixed-size rule can settle this
        cfg = parse_config(_config(root, srv.url, srv.url, size=6, success_margin=0.0, latency_margin=0.0))
        store = RunStore.create(cfg, "fixed")
        phases.build_plans(cfg, store)
        phases.start_endpoints(cfg, store, log=lambda m: None)
        phases.run_requests(cfg, store, "ab")
        phases.teardown(store, log=lambda m: None)
        phases.evaluate_run(store)
        assert phases.decide_run(store)["verdict"] == "inconclusive"

        refused = _cli(env, "continue", "--run-id", "fixed", "--max-pairs", "6", "--store", str(root))
        assert refused.returncode == 2 and "adds nothing" in refused.stderr
        t0 = time.monotonic()
        done = _cli(env, "continue", "--run-id", "fixed", "--max-pairs", "30", "--pairs-per-look", "12", "--store", str(root))
        took = time.monotonic() - t0
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    d = store.read_json("decision.json")
    print(f"continue through the CLI (Prefect flow): {took:.1f} s, {d['verdict']}, {d['continued']}")
    assert d["continued"]["from_pairs"] == 6 and 6 < d["continued"]["to_pairs"] <= 30
    assert d["sequential"]["source"] == "continue" and d["sequential"]["looks"][0]["pairs"] == 6
    assert f"decision={d['verdict']}" in done.stdout
    if d["verdict"] != "inconclusive":  # settled: a second continue is refused unless --force
        again = _cli(env, "continue", "--run-id", "fixed", "--max-pairs", "60", "--store", str(root))
        assert again.returncode == 2 and "--force" in again.stderr
    else:
        assert d["sequential"]["stopped_because"] == "cap" and d["continued"]["to_pairs"] == 30
    plan = phases.build_plans(cfg, store)["ab"]
    assert plan.looks[0].end_pair == 6 and plan.n_pairs == d["continued"]["to_pairs"]
    teardown = store.read_json("teardown.json")
    assert len(teardown["earlier"]) == 2 and len(teardown["arms"]) == 2  # torn down, restarted, torn down again
    assert json.loads(json.dumps(d))["sequential"]["method"]
    _exactly_once(store)
