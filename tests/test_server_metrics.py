"""The servers' own /metrics beside a phase (guided_ab/load/server_metrics.py), on loopback only.

tests/fixtures/vllm_metrics_idle.txt and vllm_metrics.txt are real /metrics pages of a vLLM 0.32 CPU
server (SmolLM2-135M, started as guided_ab/arms/local.py starts it), before and after three
guided requests. A small threaded HTTP server here serves them (first the idle page, then the
busy one, so the histograms move between scrapes), or fails: 404, a page that is not Prometheus
text, a stall, a closed port. The expected numbers are read from the fixture text with a regex
of its own, not through the module under test.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guided_ab.arms.base import Endpoint
from guided_ab.config import parse_config
from guided_ab.load import server_metrics as sm
from guided_ab.reports.html import render_html
from guided_ab.reports.markdown import render_markdown
from guided_ab.reports.model import build_report
from guided_ab.store import RunStore

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"
IDLE = (FIXTURES / "vllm_metrics_idle.txt").read_text()
BUSY = (FIXTURES / "vllm_metrics.txt").read_text()
LOGGER = "guided_ab.load.server_metrics"


def sample(text: str, name: str) -> float:
    """One sample's value in Prometheus text, by a regex of this test's own."""
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert m, f"{name} not in the fixture"
    return float(m.group(1))


def with_gauges(text: str, running: float, waiting: float, kv: float) -> str:
    """The page with its load gauges set (the fixtures were taken with the server idle)."""
    for name, v in (("vllm:num_requests_running", running), ("vllm:num_requests_waiting", waiting),
                    ("vllm:kv_cache_usage_perc", kv)):
        text = re.sub(rf"^({re.escape(name)}\{{[^}}]*\}}) \S+$", rf"\g<1> {v}", text, flags=re.M)
    return text


class MetricsServer:
    """/<arm>/metrics by arm name: `ok*` serves the idle page first, then busy pages (gauges
    moving); `404`, `garbage`, `stall` fail. Records each request's Authorization header."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.auth: dict[str, str | None] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                arm = self.path.strip("/").split("/")[0]
                n = outer.hits[arm] = outer.hits.get(arm, 0) + 1
                outer.auth[arm] = self.headers.get("Authorization")
                if arm.startswith("stall"):
                    time.sleep(5)
                    return
                status, body = 200, IDLE if n == 1 else with_gauges(BUSY, running=n % 3, waiting=n % 2, kv=0.1 * (n % 4))
                if arm.startswith("404"):
                    status, body = 404, '{"detail":"Not Found"}'
                elif arm.startswith("garbage"):
                    body = "<html><body>a login page</body></html>"
                elif arm.startswith("flaky") and n in (2, 3):
                    status, body = 503, "busy"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[MetricsServer]:
    s = MetricsServer()
    yield s
    s.close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _endpoint(arm: str, base_url: str, key_ref: str | None = None) -> Endpoint:
    return Endpoint(run_id="t", arm=arm, target="modal" if key_ref else "external", base_url=base_url,
                    model="m", backend="auto", key_ref=key_ref)


def _cfg(store_root: Path):
    return parse_config({
        "name": "metrics", "store": str(store_root),
        "arms": [{"name": "control", "role": "control", "target": "external", "backend": "guidance", "url": "http://127.0.0.1:9"},
                 {"name": "candidate", "role": "candidate", "target": "external", "backend": "auto", "url": "http://127.0.0.1:9"}],
    }, "test")


@pytest.fixture()
def store(tmp_path) -> RunStore:
    return RunStore.create(_cfg(tmp_path / "runs"), "metrics-" + secrets.token_hex(3))


# -- parsing ---------------------------------------------------------------------------------------
def test_the_real_vllm_page_parses_with_every_kept_metric():
    values = sm.parse_metrics(BUSY)
    # every name the module keeps is one vLLM 0.32 exports (a renamed metric fails here)
    assert set(values) == set(sm.KEPT_SAMPLES)
    for hist in sm.HISTOGRAMS.values():
        assert values[f"{hist}_count"] == sample(BUSY, f"{hist}_count") == 3
        assert values[f"{hist}_sum"] == pytest.approx(sample(BUSY, f"{hist}_sum"))
    assert values["vllm:generation_tokens_total"] == sample(BUSY, "vllm:generation_tokens_total")
    assert sm.parse_metrics(IDLE)["vllm:e2e_request_latency_seconds_count"] == 0


def test_label_sets_are_summed_and_the_kv_cache_share_averaged():
    two_engines = "\n".join([
        '# TYPE vllm:num_requests_running gauge',
        'vllm:num_requests_running{engine="0"} 2.0', 'vllm:num_requests_running{engine="1"} 3.0',
        '# TYPE vllm:kv_cache_usage_perc gauge',
        'vllm:kv_cache_usage_perc{engine="0"} 0.2', 'vllm:kv_cache_usage_perc{engine="1"} 0.4',
    ]) + "\n"
    values = sm.parse_metrics(two_engines)
    assert values["vllm:num_requests_running"] == 5
    assert values["vllm:kv_cache_usage_perc"] == pytest.approx(0.3)


@pytest.mark.parametrize("text", ["<html><body>Not Found</body></html>", '{"detail": "Not Found"}',
                                  "# TYPE up gauge\nup 1\n", "vllm:num_requests_running{engine=\"0\" 1\n", ""])
def test_a_page_that_is_not_vllm_prometheus_text_is_refused(text):
    with pytest.raises(sm.NotMetrics):
        sm.parse_metrics(text)


def test_the_metrics_url_is_beside_v1_at_the_server_root():
    assert sm.metrics_url(_endpoint("a", "https://x.modal.run")) == "https://x.modal.run/metrics"
    assert sm.metrics_url(_endpoint("a", "http://h:8000/v1")) == "http://h:8000/metrics"


# -- scraping --------------------------------------------------------------------------------------
async def _phase(seconds: float, started: list[float]) -> str:
    started.append(time.monotonic())
    await asyncio.sleep(seconds)
    return "phase result"


def test_a_phase_is_scraped_at_its_start_in_between_and_at_its_end(server, store, monkeypatch):
    monkeypatch.setenv("GAB_TEST_METRICS_KEY", "k-123")
    endpoints = {"okmodal": _endpoint("okmodal", f"{server.url}/okmodal", key_ref="env:GAB_TEST_METRICS_KEY"),
                 "oklocal": _endpoint("oklocal", f"{server.url}/oklocal")}
    started: list[float] = []
    result = asyncio.run(sm.scraped(_phase(1.0, started), store, "ab", endpoints, interval_s=0.2))
    assert result == "phase result"
    scrapes = store.metric_scrapes("ab")
    assert set(scrapes) == {"okmodal", "oklocal"}
    for arm, lines in scrapes.items():
        # start + ~4 in between + end; a loaded machine may lose one or two of those in between
        assert 3 <= len(lines) == server.hits[arm], (arm, len(lines), server.hits[arm])
        assert [ln["t"] for ln in lines] == sorted(ln["t"] for ln in lines)
        assert lines[0]["vllm:e2e_request_latency_seconds_count"] == 0 and lines[-1]["vllm:e2e_request_latency_seconds_count"] == 3
    assert server.auth == {"okmodal": "Bearer k-123", "oklocal": None}  # the run's key: Modal's web endpoint


@pytest.mark.parametrize("arm", ["404", "garbage", "stall", "closed"])
def test_an_endpoint_without_metrics_is_skipped_with_one_warning_and_the_phase_goes_on(server, store, arm, caplog):
    base = _closed_port_url() if arm == "closed" else f"{server.url}/{arm}"
    endpoints = {arm: _endpoint(arm, base), "ok": _endpoint("ok", f"{server.url}/ok")}
    started: list[float] = []
    caplog.set_level(logging.WARNING, logger=LOGGER)
    t0 = time.monotonic()
    result = asyncio.run(sm.scraped(_phase(1.0, started), store, "ab", endpoints, interval_s=0.2, timeout_s=0.5))
    took = time.monotonic() - t0
    assert result == "phase result"
    assert started[0] - t0 < 0.3, "the phase waited for a scrape before it started"
    # the phase, then at most one scrape timeout for the loop and one for the last scrape (stall: 5 s each otherwise)
    assert took < 1.0 + 2 * 0.5 + 0.8, took
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"arm '{arm}' skipped" in warnings[0].getMessage(), [w.getMessage() for w in warnings]
    if arm != "closed":
        assert server.hits[arm] == 1, "a skipped arm is not scraped again"
    assert arm not in store.metric_scrapes("ab") and len(store.metric_scrapes("ab")["ok"]) >= 3
    skipped = store.metric_scrapes("ab", include_skipped=True)[arm]
    assert len(skipped) == 1 and skipped[0]["skipped"]


def test_a_lost_scrape_after_good_ones_warns_once_and_scraping_goes_on(server, store, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    asyncio.run(sm.scraped(_phase(1.2, []), store, "ab", {"flaky": _endpoint("flaky", f"{server.url}/flaky")},
                           interval_s=0.15))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a scrape failed (HTTP 503)" in warnings[0], warnings
    assert server.hits["flaky"] >= 5, "scraping stopped after the failures"
    assert len(store.metric_scrapes("ab")["flaky"]) == server.hits["flaky"] - 2


def test_a_stopped_phase_stops_the_scraper_at_once(server, store):
    endpoints = {"ok": _endpoint("ok", f"{server.url}/ok")}

    async def main() -> None:
        task = asyncio.ensure_future(sm.scraped(asyncio.sleep(30), store, "ab", endpoints, interval_s=0.1))
        await asyncio.sleep(0.5)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0
    assert len(store.metric_scrapes("ab")["ok"]) >= 2


def test_interval_zero_scrapes_nothing(server, store):
    assert asyncio.run(sm.scraped(_phase(0.2, []), store, "ab", {"ok": _endpoint("ok", f"{server.url}/ok")},
                                  interval_s=0)) == "phase result"
    assert store.metric_scrapes("ab") == {} and "ok" not in server.hits


def test_torn_and_foreign_lines_of_the_store_are_dropped(store):
    store.append_metric_scrape("ab", "a", {"t": 1.0, "arm": "a", "vllm:num_requests_running": 1.0})
    p = store.path("metrics", "ab", "a.jsonl")
    with open(p, "ab") as f:
        f.write(b'["not a scrape"]\n{"t": "x"}\n{"t": 2.0, "arm": "a", "vllm:num_req')  # torn by a kill
    store.append_metric_scrape("ab", "a", {"t": 3.0, "arm": "a", "vllm:num_requests_running": 2.0})
    assert [s["t"] for s in store.metric_scrapes("ab")["a"]] == [1.0, 3.0]


# -- through a real phase and into the report ------------------------------------------------------
def test_a_phase_run_stores_each_arms_metrics_and_the_report_shows_where_the_time_went(server, tmp_path, monkeypatch):
    """run_requests against loopback chat servers (guided_ab.selfcheck.fault_server), /metrics from the
    server above: the run store holds each arm's scrapes, evaluation.json the time split, and
    report.md / report.html the table and the plot."""
    from guided_ab import phases
    from guided_ab.selfcheck import scenarios as sc
    from guided_ab.selfcheck.harness import run_phase, servers

    key = "gab-test-" + secrets.token_urlsafe(18)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    monkeypatch.setattr(sm, "metrics_url", lambda ep: f"{server.url}/ok-{ep.arm}/metrics")
    with servers(sb, "healthy", delay_s=0.3) as (control, cand):
        run = run_phase(sb, "metrics", control.url, cand.url, size=6, metrics_interval_s=0.2)
    assert run.acc.recorded == run.acc.planned and run.acc.lost == 0
    scrapes = run.store.metric_scrapes("ab")
    assert set(scrapes) == {"control", "candidate"} and all(len(v) >= 2 for v in scrapes.values())

    ev = run.store.read_json("evaluation.json")
    split = ev["server_metrics"]["arms"]
    for arm in ("control", "candidate"):
        mean = split[arm]["mean_s"]
        for key_, hist in sm.HISTOGRAMS.items():  # (busy - idle) sum over count; the idle page counted 0
            assert mean[key_] == pytest.approx(sample(BUSY, f"{hist}_sum") / sample(BUSY, f"{hist}_count")), key_
        assert split[arm]["requests_finished"] == 3
        assert split[arm]["client"]["answered"] == sum(1 for r in run.store.journal("ab") if r.arm == arm)
        assert split[arm]["client"]["latency_mean_s"] > 0
    assert split["candidate"]["client"]["latency_mean_s"] >= 0.3  # its fault server's delay

    cfg = run.store.load_config()
    decision = phases.decide_run(run.store)
    md = run.store.path("report.md").read_text()
    assert "## Where the servers' time went" in md
    queue_ms = sample(BUSY, "vllm:request_queue_time_seconds_sum") / 3
    assert f"| {queue_ms:.3f} |" in md
    html = run.store.path("report.html").read_text()
    assert 'id="server-time-table"' in html
    assert '<figure id="plot-server-load"' in html, "the load plot is missing or failed"  # else a note in a <p>
    # the same model without metrics: one line saying why
    ev_none = {**ev, "server_metrics": None}
    assert "No server metrics" in render_markdown(build_report(cfg, ev_none, decision, run.store.run_id))


def test_a_skipped_arm_says_why_in_the_report(store):
    store.append_metric_scrape("ab", "control", {"t": 1.0, "arm": "control", "skipped": "HTTP 404"})
    for t, text in ((1.0, IDLE), (6.0, BUSY)):
        store.append_metric_scrape("ab", "candidate", {"t": t, "arm": "candidate", **sm.parse_metrics(text)})
    split = sm.phase_time_split(store, "ab")
    assert split is not None
    ev = {"arms": {}, "control": "control", "candidates": ["candidate"], "server_metrics": split}
    model = build_report(store.load_config(), ev, {"verdict": "keep"}, store.run_id)
    md, html = render_markdown(model), render_html(model)
    assert "control: no server metrics, no /metrics (HTTP 404)." in md
    assert "| candidate |" in md and "control: no server metrics" in html
