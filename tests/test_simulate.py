"""`guided-ab simulate`: the generator is as hard as real runs, the truth is computed, the
command ends with its headline line, and identical arms with costs never switch.

Small on purpose (2 shared cores): caps of 60 pairs, truth samples of 40,000 pairs.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from guided_ab.analysis import scenarios as SC
from guided_ab.analysis import truth as T
from guided_ab.analysis.simulate import simulate
from guided_ab.cli import app

FINAL = re.compile(r"^coverage=(\d\.\d{3}|nan) wrong_decisions=(\d\.\d{3}|nan) pairs_saved=(-?\d+\.\d{3}|nan)$")
SMALL = 40_000


def test_generator_is_as_hard_as_real_runs():
    ex = SC.Experiment.draw(SC.scenario("identical"), np.random.default_rng(3))
    df, planned, costs = ex.frame()
    ab = df[(df["phase"] == "ab") & ~df["warmup"].astype(bool)]
    med = ab.groupby("outcome")["latency_s"].median()
    assert med["truncated"] > 2 * med["success"]  # truncated answers ran to max_tokens: the slow ones
    assert (ab.loc[ab["outcome"] == "truncated", "completion_tokens"] == ex.scn.world.max_tokens).all()
    assert (ab.loc[ab["outcome"] == "timeout", "latency_s"] == ex.scn.world.timeout_s).all()  # censored, recorded
    assert set(df.loc[df["phase"] == "observe", "arm"]) == {SC.CANDIDATE}  # only the candidate is observed
    assert planned["observe"] == {SC.CANDIDATE: 6}
    assert costs[SC.CONTROL] == costs[SC.CANDIDATE] > 0  # equal $/h, both held the whole run

    rep = SC.Experiment.draw(SC.scenario("identical_repeats"), np.random.default_rng(4))
    df, _, _ = rep.frame()
    ab = df[(df["phase"] == "ab") & ~df["warmup"].astype(bool) & (df["arm"] == SC.CONTROL)]
    same = ab.groupby("schema_id")["outcome"].agg(lambda s: s.nunique() == 1).mean()
    assert same > 0.9  # temperature 0: a schema's repeats come out (nearly) the same
    spread = ab[ab["outcome"] == "success"].groupby("schema_id")["latency_s"].agg(lambda s: s.std() / s.mean()).median()
    assert spread < 0.15


def test_truth_is_computed_from_the_generator():
    base = SC.scenario("identical")
    t = T.truth(base, pairs=SMALL)
    assert abs(t.values["latency_p50_ratio"] - 1) < 4 * t.mc_se["latency_p50_ratio"] + 1e-3
    assert abs(t.values["success_diff"]) < 4 * t.mc_se["success_diff"] + 1e-3
    # the same generator with a candidate that writes more: slower and more truncated, TPOT equal
    more = T.truth(SC.scenario("writes_more"), pairs=SMALL)
    assert more.values["tokens_mean_ratio"] > 1.1 and more.values["latency_p50_ratio"] > 1.1
    assert abs(more.values["tpot_p50_ratio"] - 1) < 0.02
    assert more.values["success_diff"] < -0.01
    # calibration puts a success difference on the margin exactly (up to Monte-Carlo error)
    cal = T.calibrate(SC.scenario("margin_peek"), pairs=SMALL)
    tc = T.truth(cal, pairs=SMALL)
    assert abs(tc.values["success_diff"] + 0.05) < 4 * tc.mc_se["success_diff"] + 1e-3
    # with repeats, the sequential truth at any look follows from first and repeat requests
    rep = SC.scenario("faster_repeats")
    direct, parts = T.truth(rep, 4.0, pairs=SMALL), T.sequential_parts(rep, pairs=SMALL)
    got = parts.at(4.0)["seq_latency_ratio"]
    assert abs(got - direct.values["seq_latency_ratio"]) < 5 * direct.mc_se["seq_latency_ratio"] + 2e-3


def test_identical_arms_with_costs_never_switch():
    res = simulate(6, workers=1, pairs=60, max_pairs=120, scenarios=("identical",), truth_pairs=SMALL, resamples=300)
    row = res["scenarios"][0]
    assert row["truth_verdict"] == "keep"
    for design in ("fixed_small", "fixed_mid", "fixed_cap", "sequential"):
        assert row["designs"][design]["counts"].get("switch", 0) == 0, (design, row["designs"][design])
    assert row["wrong"] == 0.0


@pytest.mark.timeout(600)
def test_small_run_prints_the_headline_last(tmp_path):
    out = tmp_path / "sim.json"
    r = CliRunner().invoke(app, ["simulate", "--experiments", "24", "--pairs", "60", "--max-pairs", "120", "--workers", "2",
                                 "--resamples", "300", "--truth-pairs", str(SMALL), "--json", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert FINAL.match(lines[-1]), lines[-1]
    assert lines[-2].startswith("naive_peeking_wrong_decisions=")
    res = json.loads(out.read_text())
    assert res["experiments"] == 24
    json.dumps(res, allow_nan=False)  # every number is a number (NaN would not be JSON)
    assert set(res["coverage_by_interval"]) == {"success_diff", "latency_p50_ratio", "latency_mean_ratio", "latency_p95_ratio"}
    assert {s["scenario"] for s in res["scenarios"]} == {s.name for s in SC.SCENARIOS}
    assert all(s["experiments"] >= 1 for s in res["scenarios"])
    for row in res["scenarios"]:  # truths were computed per scenario, with their Monte-Carlo errors
        assert set(row["truth"]) == set(row["truth_mc_se"]) and row["truth_verdict"] in ("keep", "switch", "either")
