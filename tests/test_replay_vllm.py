"""Replaying a team's own requests through two real local vLLM arms (slow: starts two servers).

One run, module-scoped: 43 Batch API lines (tool calls named and "required", response_format
answers, two prompts that cannot fit the 4096-token context, one refused sampling parameter)
through the deploy -> pre-flight -> A/B -> evaluate -> teardown phases, without Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import replay_lines
import yaml

from guided_ab import phases
from guided_ab.arms import local
from guided_ab.config import parse_config
from guided_ab.records import OUTCOMES, WORKLOAD_OUTCOMES
from guided_ab.store import RunStore

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 80


def _has_vllm() -> bool:
    try:
        local.vllm_version(local.vllm_python())
        return True
    except Exception:
        return False


if not _has_vllm():
    pytest.skip("vLLM is not installed for the local target (run scripts/install.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    lines = (replay_lines.mixed(20, 20, MAX_TOKENS) + replay_lines.overflow_lines(MAX_TOKENS)
             + [replay_lines.bad_parameter_line(MAX_TOKENS)])
    jsonl = replay_lines.write(tmp / "traffic.jsonl", lines)
    cfg_data = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    cfg_data["name"] = "it-replay"
    cfg_data["store"] = str(tmp / "runs")
    for arm in cfg_data["arms"]:  # vLLM 0.32 serves tool_choice "required" / named only with a tool-call parser
        arm["server_args"] = [*arm["server_args"], "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    cfg_data["workload"].update({"suite": str(jsonl), "size": len(lines), "observe_size": 0, "warmup": 1,
                                 "max_tokens": MAX_TOKENS, "stream_share": 0.5})
    cfg = parse_config(cfg_data)
    store = RunStore.create(cfg, "replay-1")
    try:
        phases.start_endpoints(cfg, store, log=lambda m: None)
        phases.wait_endpoints(cfg, store, phases.load_endpoints(store), log=lambda m: None)
        result = phases.run_requests(cfg, store, "ab")
    finally:
        phases.teardown(store, log=lambda m: None)
    evaluation = phases.evaluate_run(store)
    return {"lines": lines, "store": store, "result": result, "evaluation": evaluation}


def test_one_record_per_request_keyed_by_custom_id(replay_run):
    store, lines = replay_run["store"], replay_run["lines"]
    ab = store.records(("ab",))
    measured = ab[~ab.warmup]
    assert len(lines) >= 40
    for arm in ("guidance", "auto"):
        got = measured.loc[measured.arm == arm, "custom_id"].tolist()
        assert sorted(got) == sorted(ln["custom_id"] for ln in lines), arm
    assert (measured.custom_id == measured.schema_id).all()
    assert set(ab.outcome) <= set(OUTCOMES)
    shares = ab.loc[~ab.warmup, "outcome"].value_counts(normalize=True).round(3).to_dict()
    print("outcome shares:", json.dumps(shares))  # the closing note's figures (pytest -s)


def test_overflows_are_workload_problems_without_a_backend(replay_run):
    ab = replay_run["store"].records(("ab",))
    over = ab[ab.custom_id.isin(["overflow-huge", "overflow-tokens"])]
    assert len(over) == 4
    assert set(over.outcome) == {"context_overflow"}, over[["custom_id", "arm", "outcome", "error"]].to_dict("records")
    assert set(over.backend) == {"none"}
    assert over.error.str.contains("maximum context length").all()
    # prompt fits, prompt + max_tokens does not: vLLM 0.32 runs it and ends it at the context's end,
    # short of its max_tokens: a context overflow too, not a truncation to blame on a backend
    budget = ab[ab.custom_id == "overflow-budget"]
    assert set(budget.outcome) == {"context_overflow"}, budget[["arm", "outcome", "error"]].to_dict("records")
    assert set(budget.backend) == {"none"} and budget.error.str.contains("context's end").all()
    bad = ab[ab.custom_id == "bad-top-p"]
    assert set(bad.outcome) == {"invalid_request"}, bad[["outcome", "error"]]
    assert set(bad.backend) == {"none"}
    # nothing else was blamed on the workload, and no workload problem names a backend
    assert set(ab.loc[ab.backend == "none", "outcome"]) <= WORKLOAD_OUTCOMES
    assert set(ab.loc[ab.outcome.isin(WORKLOAD_OUTCOMES), "backend"]) == {"none"}


def test_tool_call_arguments_validated(replay_run):
    ab = replay_run["store"].records(("ab",))
    tools = ab[ab.custom_id.str.startswith("tool-", na=False)]
    assert len(tools) == 40
    # rejected: a backend that cannot compile vLLM's tool-call grammar (guidance in vLLM 0.32 with a
    # tool-call parser: "Invalid grammar specification: 'triggers'") is the backend's failure
    assert set(tools.outcome) <= {"success", "schema_violation", "invalid_json", "truncated", "no_tool_call",
                                  "unknown_tool", "validation_timeout", "rejected"}
    judged = tools[tools.outcome.isin(["success", "schema_violation", "invalid_json", "no_tool_call", "unknown_tool"])]
    assert len(judged) > 0
    violations = tools[tools.outcome == "schema_violation"]
    assert violations.error.str.startswith("tool call '").all()  # judged on the call's arguments
    schemas = {e["id"]: e["schema"] for e in replay_lines.suite()}
    from jsonschema import Draft202012Validator

    for _, r in tools[tools.outcome.isin(["success", "schema_violation"])].iterrows():
        calls = json.loads(r.output)  # an independent check: the recorded calls' arguments, validated again
        schema = schemas[r.custom_id.removeprefix("tool-")]
        v = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        fits = all(v.is_valid(json.loads(c["arguments"])) for c in calls)
        assert fits == (r.outcome == "success"), (r.custom_id, r.outcome, r.output)


def test_preflight_counted_the_overflows(replay_run):
    pre = replay_run["store"].read_json("preflight.json")
    assert pre["max_model_len"] == 4096
    assert pre["counted"] == len(replay_run["lines"])
    assert {t["schema_id"] for t in pre["too_long"]} == {"overflow-huge", "overflow-tokens", "overflow-budget"}


def test_evaluation_excludes_workload_problems(replay_run):
    ev = replay_run["evaluation"]
    ab = replay_run["store"].records(("ab",))
    problem_ids = set(ab.loc[ab.outcome.isin(WORKLOAD_OUTCOMES), "custom_id"])
    assert {"overflow-huge", "overflow-tokens", "overflow-budget", "bad-top-p"} <= problem_ids
    wp = ev["workload_problems"]
    assert wp["pairs"] == len(problem_ids) and wp["of_pairs"] == len(replay_run["lines"])
    assert set(wp["schemas"]) == problem_ids
    gate = next(g for g in ev["gates"] if g["name"] == "workload_problems")
    assert gate["passed"], gate
    assert ev["comparisons"]["auto"]["n_pairs"] == len(replay_run["lines"]) - len(problem_ids)


def test_servers_gone(replay_run):
    store: RunStore = replay_run["store"]
    endpoints = store.read_json("endpoints.json")
    for ep in endpoints.values():
        assert not local._alive(ep["pid"]), ep["arm"]
