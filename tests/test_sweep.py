"""The rate sweep (guided_ab/sweep.py, `guided-ab sweep`) against loopback servers of known
capacity (no vLLM): each serves `slots` requests at a time, `delay_s` each, so it completes at
most slots / delay_s requests per second and queues the rest; the slow one has less than half the
fast one's capacity, so their knees must differ. The fast one also exports vLLM-style /metrics
(its own queue wait and service time), so the report's server time split is checked too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from guided_ab import phases
from guided_ab import sweep as S
from guided_ab.cli import app
from guided_ab.config import ConfigError, parse_config
from guided_ab.plan import Plan
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

KEY = "sweep-test-key"


class CapacityServer(FaultServer):
    """The loopback fault server, healthy, with a capacity: `slots` requests served at once,
    `delay_s` each; the others wait their turn (the server's queue). With `metrics`, GET /metrics
    answers vLLM's histogram and gauge names with its own queue wait and service time."""

    def __init__(self, slots: int, delay_s: float, *, metrics: bool = False):
        super().__init__("healthy", api_key=KEY, delay_s=delay_s)
        self.slots, self.metrics = slots, metrics
        self._sem: asyncio.Semaphore | None = None
        self.queue_s = self.service_s = 0.0
        self.done = self.running = self.waiting = 0

    @property
    def capacity(self) -> float:
        return self.slots / self.delay_s

    async def _chat(self, headers, body, reader, writer):
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        t0 = time.perf_counter()
        self.waiting += 1
        async with self._sem:
            self.waiting -= 1
            self.running += 1
            t1 = time.perf_counter()
            try:
                return await super()._chat(headers, body, reader, writer)
            finally:
                self.running -= 1
                self.queue_s += t1 - t0
                self.service_s += time.perf_counter() - t1
                self.done += 1

    async def _route(self, method, path, headers, body, reader, writer):
        if path == "/metrics" and method == "GET" and self.metrics:
            m = 'model_name="guided-ab-model"'
            lines = [f"vllm:request_queue_time_seconds_sum{{{m}}} {self.queue_s}",
                     f"vllm:request_queue_time_seconds_count{{{m}}} {self.done}",
                     f"vllm:request_prefill_time_seconds_sum{{{m}}} 0.0",
                     f"vllm:request_prefill_time_seconds_count{{{m}}} {self.done}",
                     f"vllm:request_decode_time_seconds_sum{{{m}}} {self.service_s}",
                     f"vllm:request_decode_time_seconds_count{{{m}}} {self.done}",
                     f"vllm:e2e_request_latency_seconds_sum{{{m}}} {self.queue_s + self.service_s}",
                     f"vllm:e2e_request_latency_seconds_count{{{m}}} {self.done}",
                     f"vllm:num_requests_running{{{m}}} {self.running}",
                     f"vllm:num_requests_waiting{{{m}}} {self.waiting}"]
            return await self._send(writer, 200, ("\n".join(lines) + "\n").encode(), content_type="text/plain")
        return await super()._route(method, path, headers, body, reader, writer)


def _config(root: Path, fast_url: str, slow_url: str, **sweep) -> dict:
    arm = {"target": "external", "api_key_env": "SWEEP_TEST_KEY", "model": "guided-ab-model"}
    return {
        "name": "sweep-test", "store": str(root),
        "arms": [{"name": "fast", "role": "control", "backend": "guidance", "url": fast_url, **arm},
                 {"name": "slow", "role": "candidate", "backend": "auto", "url": slow_url, **arm}],
        "workload": {"size": 4, "observe_size": 0, "warmup": 1, "timeout_s": 20, "metrics_interval_s": 0.5},
        # constant arrivals: the ladder's rates are exact, the test needs no luck
        "sweep": {"saturation_concurrency": 8, "saturation_requests": 20, "steps": 4, "low": 0.4, "high": 1.6,
                  "profile": "constant", "duration_s": 1.2, "min_requests": 4, "max_in_flight": 64, **sweep},
    }


@pytest.fixture()
def key_env(monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_KEY", KEY)


def _sweep(cfg_data: dict, run_id: str) -> tuple[RunStore, dict]:
    """What the sweep flow runs, without Prefect: deploy (external arms), the sweep, teardown."""
    cfg = parse_config(cfg_data)
    store = RunStore.create(cfg, run_id)
    phases.start_endpoints(cfg, store, log=lambda m: None)
    try:
        result = S.run_sweep(cfg, store, log=lambda m: None)
    finally:
        phases.teardown(store, log=lambda m: None)
    return store, result


def _phases(store: RunStore, result: dict) -> list[str]:
    return [p for arm, a in result["arms"].items()
            for p in [S.saturation_phase(arm), *(S.step_phase(arm, k) for k in range(1, len(a["ladder"]) + 1))]]


def _one_record_per_request(store: RunStore, phase: str) -> None:
    plan = Plan.model_validate(store.read_json(f"plan-{phase}.json"))
    ids = [r.request_id for r in store.journal(phase)]
    assert Counter(ids).most_common(1)[0][1] == 1, f"{phase}: a request was recorded twice"
    assert sorted(ids) == sorted(r.request_id for r in plan.requests), f"{phase}: every planned request has its one record"


def test_sweep_finds_each_arms_knee_below_its_capacity_and_resumes(tmp_path, key_env):
    with CapacityServer(2, 0.1, metrics=True) as fast, CapacityServer(2, 0.25) as slow:
        t0 = time.monotonic()
        store, result = _sweep(_config(tmp_path / "runs", fast.url, slow.url), "s1")
        took = time.monotonic() - t0
        f, s = result["arms"]["fast"], result["arms"]["slow"]
        for a, srv in ((f, fast), (s, slow)):
            # the closed loop measured the server's capacity, and the ladder climbs past it
            assert 0.7 * srv.capacity <= a["saturation"]["max_rate"] <= 1.15 * srv.capacity, a["saturation"]
            assert len(a["ladder"]) == 4 and a["ladder"][-1] > a["saturation"]["max_rate"]
            assert a["complete"] and len(a["steps"]) == 4
            low, top = a["steps"][0], a["steps"][-1]
            assert low["sustained"] and low["achieved_rate"] >= 0.9 * low["target_rate"], low
            # past the capacity: the arm falls behind the arrivals and the server's queue builds up
            assert not top["sustained"] and top["achieved_rate"] < 0.9 * top["target_rate"], top
            assert top["latency"]["p50"]["estimate"] > 1.5 * low["latency"]["p50"]["estimate"]
            k = a["knee"]
            assert k["rate"] is not None and k["rate"] <= 1.05 * srv.capacity, k
        assert s["knee"]["rate"] < f["knee"]["rate"], (s["knee"], f["knee"])
        for phase in _phases(store, result):
            _one_record_per_request(store, phase)
        # open loop: every request was scheduled, and the lag of its send is recorded
        recs = store.journal(S.step_phase("fast", 2))
        assert all(r.scheduled_at is not None and r.send_lag_s is not None for r in recs)
        assert f["steps"][1]["send_lag_ms"]["p99"] < 500
        # the server's own view (its /metrics): its queue time grows with the rate; none for the slow arm
        queue = [st["server"]["mean_s"]["queue"] for st in f["steps"]]
        assert queue[-1] > queue[0] + 0.05, queue
        assert all(st["server"] is None or "why" in st["server"] for st in s["steps"])

        # a sweep stopped mid-step resumes: only the unrecorded requests are sent again
        phase = S.step_phase("slow", 3)
        journal = store.journal_path(phase)
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(b"".join(lines[: len(lines) // 2]))
        store.path("records", f"{phase}.parquet").unlink()
        before = store.sent_counts(phase)
        served = (fast.done, slow.done)
        again = S.run_sweep(parse_config(_config(tmp_path / "runs", fast.url, slow.url)), store, log=lambda m: None)
        lost = len(lines) - len(lines) // 2
        assert (fast.done, slow.done) == (served[0], served[1] + lost)  # complete steps are not sent again
        _one_record_per_request(store, phase)
        resent = {rid for rid, n in store.sent_counts(phase).items() if n == before[rid] + 1}
        assert len(resent) == lost and all(r.attempt == 2 for r in store.journal(phase) if r.request_id in resent)
        assert again["arms"]["slow"]["ladder"] == s["ladder"]  # the same ladder: fixed once measured
    print(f"the sweep of two arms took {took:.0f} s")

    # the report: curves per arm with the knee, every step's table, the server's time split; the picture
    page = store.path("sweep-report.html").read_text()
    assert 'data-testid="plot-sweep"' in page and "<svg" in page and "plot unavailable" not in page
    assert 'data-testid="knee-fast"' in page and 'data-testid="knee-slow"' in page and "knee at" in page
    assert 'data-testid="steps-fast"' in page and "server time per request" in page
    assert store.path("sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(store.path("sweep.json").read_text())
    assert saved["arms"]["slow"]["knee"] == again["arms"]["slow"]["knee"]


@pytest.mark.parametrize(("sweep", "field"), [
    ({"low": 0.8, "high": 0.5}, "sweep: Value error, high (0.5) must be above low"),
    ({"rates": [0.5, 0.2]}, "sweep.rates"),
    ({"rates": [0, 1]}, "sweep.rates"),
    ({"count": 10, "duration_s": 5}, "sweep: Value error, count and duration_s"),
    ({"duration_s": -1}, "sweep.duration_s"),
    ({"max_in_flight": 0}, "sweep.max_in_flight"),
    ({"knee_latency_factor": 1}, "sweep.knee_latency_factor"),
    ({"profile": "closed"}, "sweep.profile"),
    ({"step": 3}, "sweep.step"),
    ({"saturation_requests": 10}, "saturation_requests (10) must be at least 2 x saturation_concurrency (8)"),
])
def test_bad_sweep_config_is_refused_naming_the_field(tmp_path, sweep, field):
    data = _config(tmp_path / "runs", "http://127.0.0.1:9", "http://127.0.0.1:9", **sweep)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value), str(err.value)


def test_cli_sweep_dry_run_and_bad_config(tmp_path):
    good = _config(tmp_path / "runs", "http://127.0.0.1:9", "http://127.0.0.1:9")
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(good))
    res = CliRunner().invoke(app, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "saturation: closed loop, 8 in flight, 20 requests" in res.output and "4 rates from 0.4 to 1.6" in res.output
    assert not (tmp_path / "runs").exists()  # nothing started, no run store
    p.write_text(yaml.safe_dump({**good, "sweep": {"max_in_flight": -3}}))
    res = CliRunner().invoke(app, ["sweep", str(p)])
    assert res.exit_code == 2 and "sweep.max_in_flight" in res.output, res.output
