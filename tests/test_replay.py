"""Replaying a team's own requests, fast (no vLLM): bad JSONL -> exit 2 naming file and line;
tool-call classification; refusals that are the workload's, not the grammar's; old parquet
files without `custom_id`; workload problems excluded from the comparison with a gate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import replay_lines
import yaml

from guided_ab.config import Workload
from guided_ab.load.classify import classify, classify_async, refusal_class
from guided_ab.load.client import RawResponse, _read_body, _StreamState, request_body
from guided_ab.records import OUTCOMES, RECORD_COLUMNS
from guided_ab.replay import tool_spec
from guided_ab.workload import load_workload

REPO = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())


def run_cli(*args):
    from typer.testing import CliRunner

    from guided_ab.cli import app

    return CliRunner().invoke(app, list(args))


def _config(tmp_path: Path, jsonl: Path, size: int) -> Path:
    d = copy.deepcopy(GOOD)
    d["store"] = str(tmp_path / "runs")
    d["workload"].update({"suite": str(jsonl), "size": size, "observe_size": 0})
    p = tmp_path / "replay.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


GOOD_LINES = replay_lines.mixed(3, 3, 32)


def _bad(mutate) -> list[str]:
    lines = [json.dumps(ln) for ln in copy.deepcopy(GOOD_LINES)]
    bad = json.loads(lines[3])
    out = mutate(bad)
    lines[3] = out if isinstance(out, str) else json.dumps(bad)
    return lines


def _tools(ln: dict, tools: list, choice) -> None:
    ln["body"].pop("response_format", None)
    ln["body"].update(tools=tools, tool_choice=choice)


BAD_CASES = {
    "not-json": (lambda ln: '{"custom_id": "x", "method": "POST",', "not a JSON object"),
    "unknown-url": (lambda ln: ln.update(url="/v1/embeddings"), "'/v1/embeddings' is not replayed"),
    "get": (lambda ln: ln.update(method="GET"), "only POST"),
    "no-schema": (lambda ln: [ln["body"].pop(k, None) for k in ("tools", "tool_choice", "response_format")],
                  "the body has no schema"),
    "bad-tool-parameters": (lambda ln: _tools(ln, [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objekt"}}}], "required"), "tool 'f' parameters: not a valid JSON schema"),
    "tool-choice-auto": (lambda ln: _tools(ln, [{"type": "function", "function": {"name": "f"}}], "auto"),
                         "tool_choice must be"),
    "unknown-named-tool": (lambda ln: _tools(ln, [{"type": "function", "function": {"name": "f"}}],
                                             {"type": "function", "function": {"name": "g"}}), "names function 'g'"),
    "both": (lambda ln: ln["body"].update(tools=[{"type": "function", "function": {"name": "f"}}],
                                          tool_choice="required"), "either response_format or tools"),
    "no-custom-id": (lambda ln: ln.pop("custom_id"), "custom_id"),
    "duplicate-custom-id": (lambda ln: ln.update(custom_id=GOOD_LINES[0]["custom_id"]), "already used on line 1"),
    "no-messages": (lambda ln: ln["body"].pop("messages"), "body.messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_jsonl_exits_2_naming_file_and_line(tmp_path, case):
    mutate, says = BAD_CASES[case]
    jsonl = tmp_path / "traffic.jsonl"
    jsonl.write_text("\n".join(_bad(mutate)) + "\n")
    result = run_cli("run", str(_config(tmp_path, jsonl, 4)), "--dry-run")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{jsonl}:4" in text, text
    assert says in text, text
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_file_exits_2(tmp_path):
    result = run_cli("run", str(_config(tmp_path, tmp_path / "nope.jsonl", 4)), "--dry-run")
    assert result.exit_code == 2 and "nope.jsonl" in result.output


def test_replay_items_sampled_and_sent_as_written(tmp_path):
    jsonl = replay_lines.write(tmp_path / "t.jsonl", GOOD_LINES)
    wl = Workload(suite=str(jsonl), size=4, observe_size=2, seed=7)
    items = load_workload(wl)
    assert len({it.schema_id for it in items}) == 6
    assert all(it.custom_id == it.schema_id and it.body for it in items)
    assert items == load_workload(wl)  # seeded
    it = next(i for i in items if i.body and "tools" in i.body)
    body = request_body("arm-model", True, it.body)
    assert body["model"] == "arm-model" and body["stream"] and body["stream_options"] == {"include_usage": True}
    original = next(ln["body"] for ln in GOOD_LINES if ln["custom_id"] == it.custom_id)
    assert {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")} == original


def test_builtin_suite_in_tool_mode():
    items = load_workload(Workload(mode="tools", size=3, observe_size=0))
    for it in items:
        functions, required = tool_spec(it.body)
        assert required and list(functions.values()) == [it.json_schema]
        assert it.body["tool_choice"] == "required"


def test_example_replay_config_loads():
    from guided_ab.config import load_config
    from guided_ab.phases import workload_items

    cfg = load_config(REPO / "configs" / "replay.yaml")
    _, ab = workload_items(cfg)
    assert len(ab) == cfg.workload.size >= 12
    assert {"tools" in it.body for it in ab if it.body} == {True, False}
    cfg = load_config(REPO / "configs" / "local-tools.yaml")
    _, ab = workload_items(cfg)
    assert all(it.body and it.body["tool_choice"] == "required" for it in ab)


# -- classification -----------------------------------------------------------------------------
WEATHER = replay_lines.suite()[0]


def _raw(**kw) -> RawResponse:
    return RawResponse(sent_at=0.0, http_status=200, finish_reason="stop", **kw)


SPEC = ({"get_weather": WEATHER["schema"]}, True)


@pytest.mark.parametrize(("calls", "outcome"), [
    ([{"name": "get_weather", "arguments": '{"location": "Lisbon", "unit": "celsius"}'}], "success"),
    ([{"name": "get_weather", "arguments": '{"location": "Lisbon", "unit": "kelvin"}'}], "schema_violation"),
    ([{"name": "get_weather", "arguments": '{"location": '}], "invalid_json"),
    ([{"name": "get_time", "arguments": "{}"}], "unknown_tool"),
    (None, "no_tool_call"),
])
def test_tool_calls_classified(calls, outcome):
    raw = _raw(text="" if calls else "I think it is sunny", tool_calls=calls)
    assert classify(raw, WEATHER["schema"], tools=SPEC)[0] == outcome
    import asyncio

    assert asyncio.run(classify_async(raw, WEATHER["schema"], tools=SPEC))[0] == outcome


def test_tool_calls_read_from_body_and_stream():
    body = {"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"a": 1}'}}]},
        "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    out = RawResponse(sent_at=0.0)
    _read_body(json.dumps(body).encode(), out)
    assert out.tool_calls == [{"name": "get_weather", "arguments": '{"a": 1}'}] and out.failure is None
    out = RawResponse(sent_at=0.0, http_status=200)
    st = _StreamState(out)
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"location": "Li'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'sbon", "unit": "celsius"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]
    for i, e in enumerate(events):
        assert st.feed(b"data: " + json.dumps(e).encode(), 1.0 + i, 0.0)
    st.feed(b"data: [DONE]", 9.0, 0.0)
    st.finish()
    assert out.tool_calls == [{"name": "get_weather", "arguments": '{"location": "Lisbon", "unit": "celsius"}'}]
    assert out.ttft_s == 3.0  # the first (non-empty) argument piece is the first token
    assert classify(out, WEATHER["schema"], tools=SPEC)[0] == "success"


VLLM_OVERFLOW = ("This model's maximum context length is 4096 tokens. However, your prompt contains at least 4097 "
                 "input tokens, which exceeds this limit even without any output tokens. Please reduce the length "
                 "of the input prompt.")


@pytest.mark.parametrize(("status", "message", "outcome"), [
    (400, VLLM_OVERFLOW, "context_overflow"),
    (400, "This model's maximum context length is 4096 tokens. However, your prompt contains 90000 characters "
          "(more than 16380 characters, ...)", "context_overflow"),
    (400, "top_p must be in (0, 1], got 5.0.", "invalid_request"),
    (400, 'tool_choice="required" requires --tool-call-parser to be set', "invalid_request"),
    (400, 'Grammar error: Unimplemented keys: ["uniqueItems"]', "rejected"),
    (400, "The provided JSON schema contains features not supported by xgrammar.", "rejected"),
    (404, "The model `x` does not exist.", "rejected"),
])
def test_refusals_sorted_by_whose_they_are(status, message, outcome):
    assert refusal_class(status, message) == outcome
    raw = RawResponse(sent_at=0.0, http_status=status, error=message)
    assert classify(raw, {})[0] == outcome
    streamed = RawResponse(sent_at=0.0, http_status=200, failure="rejected", error=f"HTTP {status} (in stream): {message}")
    assert classify(streamed, {})[0] == (outcome if status == 400 else "rejected")


def test_new_outcomes_are_known_everywhere():
    from guided_ab.analysis.pairs import ANSWERED_OUTCOMES
    from guided_ab.records import WORKLOAD_OUTCOMES

    assert {"no_tool_call", "unknown_tool", "context_overflow", "invalid_request"} <= set(OUTCOMES)
    assert {"no_tool_call", "unknown_tool"} <= ANSWERED_OUTCOMES
    assert not WORKLOAD_OUTCOMES & ANSWERED_OUTCOMES


def test_old_parquet_without_custom_id_reads(tmp_path):
    from synthetic_run import make_finished_run

    store = make_finished_run(tmp_path / "runs", pairs=20, decide=False)
    for phase in ("observe", "ab"):
        p = store.path("records", f"{phase}.parquet")
        df = pd.read_parquet(p).drop(columns=["custom_id"])
        df.to_parquet(p, index=False)
        store.journal_path(phase).unlink()
    df = store.records()
    assert list(df.columns) == RECORD_COLUMNS and df.custom_id.isna().all()


def test_workload_problems_excluded_and_gated(tmp_path):
    from synthetic_run import make_finished_run

    from guided_ab import phases

    store = make_finished_run(tmp_path / "runs", pairs=40, decide=False)
    df = store.records()
    ab = df[(df.phase == "ab") & ~df.warmup]
    bad_pairs = sorted(ab.pair_index.unique())[:6]
    mask = (df.phase == "ab") & df.pair_index.isin(bad_pairs) & (df.arm == "auto")
    df.loc[mask, "outcome"] = "context_overflow"
    df.loc[mask, "backend"] = "none"
    for phase in ("observe", "ab"):
        df[df.phase == phase].to_parquet(store.path("records", f"{phase}.parquet"), index=False)
        store.journal_path(phase).unlink()
    ev = phases.evaluate_run(store)
    wp = ev["workload_problems"]
    assert (wp["pairs"], wp["of_pairs"]) == (6, 40) and wp["by_outcome"] == {"context_overflow": 6}
    assert ev["comparisons"]["auto"]["n_pairs"] == 34  # whole pairs left the comparison, both arms
    assert set(wp["success_rate_if_included"]) == {"guidance", "auto"}
    gate = next(g for g in ev["gates"] if g["name"] == "workload_problems")
    assert gate["passed"] and "6 of 40" in gate["detail"]  # 15 % <= the default cap of 20 %
    from guided_ab.config import DecisionOverrides

    ev = phases.evaluate_run(store, DecisionOverrides(max_workload_problem_share=0.1))
    gate = next(g for g in ev["gates"] if g["name"] == "workload_problems")
    assert not gate["passed"] and not ev["valid"]
    assert "max_workload_problem_share" in gate["detail"]


# -- the attribution middleware names no backend for a workload refusal ---------------------------
@pytest.mark.parametrize(("status", "message", "named"), [
    (400, VLLM_OVERFLOW, False),
    (400, "top_p must be in (0, 1], got 5.0.", False),
    (400, 'Grammar error: Unimplemented keys: ["uniqueItems"]', True),
    (200, None, True),
])
def test_attribution_header_withheld_for_workload_refusals(monkeypatch, status, message, named):
    import asyncio
    from types import SimpleNamespace

    from guided_ab.in_server import attribution

    monkeypatch.setattr(attribution, "resolve_backend", lambda engine, schema: "xgrammar")
    body = json.dumps(replay_lines.answer_line(WEATHER, max_tokens=8)["body"]).encode()
    payload = json.dumps({"error": {"message": message, "code": status}} if message else {"choices": []}).encode()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": payload})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "app": SimpleNamespace(state=SimpleNamespace(engine_client=object()))}
    asyncio.run(attribution.BackendAttributionMiddleware(app)(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (attribution.HEADER in dict(sent[0]["headers"])) is named


def test_attribution_schema_of_tool_requests():
    from guided_ab.in_server.attribution import requested_schema

    named = replay_lines.tool_line(WEATHER, named=True, max_tokens=8)["body"]
    assert requested_schema(named) == WEATHER["schema"]
    required = replay_lines.tool_line(WEATHER, named=False, max_tokens=8)["body"]
    schema = requested_schema(required)
    assert schema["type"] == "array" and schema["minItems"] == 1


def test_report_and_console_show_workload_problems_apart(tmp_path):
    from synthetic_run import make_finished_run

    from guided_ab import phases
    from guided_ab.reports.console import workload_problems_lines

    store = make_finished_run(tmp_path / "runs", pairs=30, decide=False)
    df = store.records()
    mask = (df.phase == "ab") & df.pair_index.isin([0, 1]) & (df.arm == "guidance")
    df.loc[mask, ["outcome", "backend", "error"]] = ["context_overflow", "none", "This model's maximum context length ..."]
    for phase in ("observe", "ab"):
        df[df.phase == phase].to_parquet(store.path("records", f"{phase}.parquet"), index=False)
        store.journal_path(phase).unlink()
    phases.evaluate_run(store)
    phases.decide_run(store)
    md = store.path("report.md").read_text()
    assert "## Workload problems" in md and "2 of 30 A/B pairs" in md and "Sensitivity" in md
    assert workload_problems_lines(store.dir) == [
        "workload problems (not the backends'): 2 of 30 A/B pairs (6.7%: context_overflow 2) excluded from the comparison"]


# -- pre-flight ---------------------------------------------------------------------------------------
def test_preflight_counts_with_the_servers_tokenize(tmp_path):
    import httpx

    from guided_ab.load.preflight import count_prompts, summary

    lines = replay_lines.mixed(2, 2, 32) + replay_lines.overflow_lines(64)
    items = load_workload(Workload(suite=str(replay_lines.write(tmp_path / "t.jsonl", lines)), size=len(lines),
                                   observe_size=0))
    seen = []

    def tokenize(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        words = sum(len(str(m["content"]).split()) for m in body["messages"])
        return httpx.Response(200, json={"count": words + 40, "max_model_len": 4096, "tokens": []})

    out = count_prompts(items, "http://arm:8000", "m", Workload(), transport=httpx.MockTransport(tokenize))
    assert out["counted"] == len(lines) and out["max_model_len"] == 4096
    assert {t["schema_id"] for t in out["too_long"]} == {"overflow-huge", "overflow-tokens", "overflow-budget"}
    assert all(b["model"] == "m" for b in seen) and any("tools" in b for b in seen)  # counted as the chat request
    assert "3 cannot fit max_model_len 4096" in summary(out)
    missing = count_prompts(items, "http://arm:8000", "m", Workload(),
                            transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    assert missing["counted"] == 0 and missing["not_counted"] == len(lines) and "404" in missing["error"]
    assert "not counted" in summary(missing)


def test_preflight_drop_replaces_what_cannot_fit(tmp_path, monkeypatch):
    from guided_ab import phases
    from guided_ab.arms.base import Endpoint
    from guided_ab.config import parse_config
    from guided_ab.load import preflight as pf
    from guided_ab.store import RunStore

    lines = replay_lines.overflow_lines(64) + replay_lines.mixed(4, 4, 32)
    jsonl = replay_lines.write(tmp_path / "t.jsonl", lines)
    d = copy.deepcopy(GOOD)
    d["store"] = str(tmp_path / "runs")
    d["workload"].update({"suite": str(jsonl), "size": 6, "observe_size": 0, "preflight": "drop", "seed": 3})
    cfg = parse_config(d)
    store = RunStore.create(cfg, "drop-1")
    phases.save_endpoints(store, {a.name: Endpoint(run_id="drop-1", arm=a.name, target="local", base_url="http://x:1",
                                                   model="m", backend=a.backend) for a in cfg.arms})
    before = phases.build_plans(cfg, store)["ab"]
    too_long = {"overflow-huge", "overflow-tokens", "overflow-budget"}

    def fake_count(items, base_url, model, wl, **kw):
        return {"counted": len(items), "not_counted": 0, "max_model_len": 4096, "error": None, "counted_by": base_url,
                "tokens": {it.schema_id: 5000 if it.schema_id in too_long else 100 for it in items},
                "too_long": [{"schema_id": it.schema_id, "custom_id": it.custom_id, "prompt_tokens": 5000,
                              "max_tokens": 64, "max_model_len": 4096} for it in items if it.schema_id in too_long]}

    monkeypatch.setattr(pf, "count_prompts", fake_count)
    result = phases.preflight(cfg, store, log=lambda m: None)
    after = phases.build_plans(cfg, store)["ab"]
    planned_before = {r.schema_id for r in before.requests if not r.warmup}
    planned_after = {r.schema_id for r in after.requests if not r.warmup}
    assert set(result["dropped"]) == planned_before & too_long and result["dropped"]
    assert not planned_after & too_long and len(planned_after) == 6
    assert set(result["replaced_by"]) == planned_after - planned_before
    assert store.read_json("preflight.json")["dropped"] == result["dropped"]


def test_answer_cut_at_the_contexts_end_is_a_context_overflow():
    raw = RawResponse(sent_at=0.0, http_status=200, finish_reason="length", text='{"a": ', prompt_tokens=4051,
                      completion_tokens=45)
    outcome, error = classify(raw, {}, max_tokens=80)
    assert outcome == "context_overflow" and "45 of max_tokens 80" in error
    assert classify(raw, {}, max_tokens=45)[0] == "truncated"  # it used its whole budget
    assert classify(raw, {})[0] == "truncated"  # budget unknown: as before


def test_the_html_report_shows_workload_problems_apart():
    from guided_ab.reports.html import _workload_problems

    ev = {"workload_problems": {"pairs": 3, "of_pairs": 44, "share": 3 / 44, "by_outcome": {"context_overflow": 6},
                                "success_rate_excluded": {"guidance": 0.5, "auto": 0.4},
                                "success_rate_if_included": {"guidance": 0.46, "auto": 0.36}, "schemas": ["long-1", "long-2"]},
          "preflight": {"counted": 44, "too_long": ["long-1", "long-2", "long-3"], "max_model_len": 4096, "policy": "keep"}}
    html = _workload_problems(ev)
    assert "3 of 44 A/B pairs (6.8%)" in html and "context_overflow 6" in html and "<code>none</code>" in html
    assert "46.0%" in html and "long-2" in html and "3 could not fit max_model_len 4096" in html
    assert "every A/B request reached the backends" in _workload_problems({})
