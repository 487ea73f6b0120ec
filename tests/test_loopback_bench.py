"""Smoke test of the load path on loopback: bench/loopback_server.py and our load generator
(guided_ab.load.runner.run_plan + guided_ab.load.client) at small scale. Complete records, exactly once,
resumable, and TTFT / latency close to the server's own timings. The full comparison with
guidellm is bench/loadgen_vs_guidellm.py (docs/performance.md)."""

from __future__ import annotations

import asyncio
import json
import statistics
import urllib.request
from pathlib import Path

import pytest
from loopback_run import loopback_run

from guided_ab.config import Workload
from guided_ab.load.client import RawResponse, _StreamState
from guided_ab.load.runner import run_plan
from guided_ab.plan import make_plan
from guided_ab.workload import WorkItem

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}


def _run(coro):
    """Run like the product does (guided_ab.phases.run_requests): on uvloop where installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _call(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _plan(n_items: int, arms=("a", "b")):
    items = [WorkItem(schema_id=f"s{i:03d}", subset="smoke", prompt=f"request {i}", json_schema=SCHEMA)
             for i in range(n_items)]
    return make_plan("ab", list(arms), items, seed=3)


def _setup(url: str, root: Path, arms=("a", "b")):
    return loopback_run(url, root, "smoke", arms)


def test_records_complete_and_ttft_close_to_server(loopback, tmp_path):
    _call(loopback, "/bench/config", {"token_delay_ms": 2, "tokens": 20, "program": []})
    _call(loopback, "/bench/timings?clear=1")
    plan = _plan(24)  # 48 requests over two arms
    store, endpoints = _setup(loopback, tmp_path)
    result = _run(run_plan(plan, endpoints, store, Workload(concurrency=8, max_tokens=20, timeout_s=30)))

    assert (result.planned, result.recorded, result.sent_now) == (48, 48, 48)
    assert dict(result.outcomes) == {"success": 48}
    records = store.journal("ab")
    assert sorted(r.request_id for r in records) == sorted(r.request_id for r in plan.requests)  # exactly once
    assert sum(store.sent_counts("ab").values()) == 48
    assert {r.backend for r in records} == {"loopback"}  # the response header, not the config

    server = {t["id"]: t for t in _call(loopback, "/bench/timings?clear=1")}
    ttft_err, e2e_err = [], []
    for r in records:
        s = server[json.loads(r.output)["id"]]
        assert s["ok"] and r.completion_tokens == 20
        ttft_err.append(r.ttft_s - (s["t_first"] - s["t_recv"]))
        e2e_err.append(r.latency_s - (s["t_end"] - s["t_recv"]))
    # the client cannot see a token before the server sent it (1 ms of clock slack) ...
    assert min(ttft_err) > -0.001 and min(e2e_err) > -0.001
    # ... and adds little (about 1 ms here when the machine is idle; the bounds are generous
    # because a shared 2-core machine stalls any process now and then)
    assert min(ttft_err) < 0.010 and statistics.median(ttft_err) < 0.050, sorted(ttft_err)
    assert min(e2e_err) < 0.010 and statistics.median(e2e_err) < 0.050, sorted(e2e_err)


def test_resume_sends_only_unrecorded_requests(loopback, tmp_path):
    _call(loopback, "/bench/config", {"token_delay_ms": 0, "tokens": 8, "program": []})
    plan = _plan(5, arms=("a",))
    store, endpoints = _setup(loopback, tmp_path, arms=("a",))
    wl = Workload(concurrency=2, max_tokens=8, timeout_s=30)
    first = _run(run_plan(plan.model_copy(update={"requests": plan.requests[:2]}), endpoints, store, wl))
    assert first.sent_now == 2
    in_flight = plan.requests[2].request_id  # sent, then the process died before recording it
    with open(store.path("records", "ab.sent"), "a") as f:
        f.write(in_flight + "\n")

    again = _run(run_plan(plan, endpoints, store, wl))
    assert (again.recorded_before, again.sent_now, again.recorded) == (2, 3, 5)
    records = store.journal("ab")
    assert sorted(r.request_id for r in records) == sorted(r.request_id for r in plan.requests)
    assert {r.request_id: r.attempt for r in records}[in_flight] == 2
    assert _run(run_plan(plan, endpoints, store, wl)).sent_now == 0  # nothing left to send


def test_arrivals_pace_the_sends(loopback, tmp_path):
    _call(loopback, "/bench/config", {"token_delay_ms": 0, "tokens": 8, "program": []})
    plan = _plan(6, arms=("a",))
    store, endpoints = _setup(loopback, tmp_path, arms=("a",))
    arrivals = [0.05 * i for i in range(6)]
    _run(run_plan(plan, endpoints, store, Workload(concurrency=6, max_tokens=8), arrivals=arrivals))
    sent = sorted(r.sent_at for r in store.journal("ab"))
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert all(g > 0.03 for g in gaps), gaps  # not all at once: each waits for its arrival time


@pytest.mark.parametrize(
    "lines, failure",
    [
        ([b'data: {"choices":[{"delta":{"content":"{}"},"finish_reason":"stop"}]}', b"data: [DONE]"], None),
        ([b"data: {not json"], "protocol"),
        ([b'data: {"error":{"message":"boom"}}'], "protocol"),
        ([b'data: {"choices":["not a dict"]}'], "protocol"),
        ([b'data: {"choices":[{"delta":{"content":"{"}}]}'], "connection_error"),  # cut before the end
    ],
)
def test_stream_events_are_classified(lines, failure):
    out = RawResponse(sent_at=0.0)
    state = _StreamState(out)
    for line in lines:
        if not state.feed(line, 1.0, 0.0):
            break
    state.finish()
    assert out.failure == failure
    if failure is None:
        assert (out.text, out.finish_reason, out.ttft_s) == ("{}", "stop", 1.0)
