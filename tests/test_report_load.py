"""The report's "Load as offered" block (guided_ab/analysis/offered_load.py) and the observe phase's
server time split, through real phases against loopback chat servers (guided_ab.selfcheck's fault
server, no vLLM): deploy (external endpoints) -> observe -> A/B -> teardown -> evaluate -> decide.

The expected figures are computed here from the run's own records, in plain Python (statistics,
not the pandas path of the module under test); an open loop whose in-flight cap holds requests back
must show it (late requests, achieved well under the offered rate); a closed loop, and an evaluation
written before the block existed, must render without it.
"""

from __future__ import annotations

import secrets
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server_metrics import BUSY, MetricsServer, sample

from guided_ab import phases
from guided_ab.load import server_metrics as sm
from guided_ab.reports.html import render_html
from guided_ab.reports.markdown import render_markdown
from guided_ab.reports.model import build_report
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.harness import servers
from guided_ab.store import RunStore

pytestmark = pytest.mark.timeout(120)

RATE = 80.0  # pairs/s offered ...
CAP = 1  # ... but one request in flight, the candidate's answered after DELAY_S: the cap holds arrivals back
DELAY_S = 0.03
PAIRS = 24


@pytest.fixture()
def metrics_server() -> Iterator[MetricsServer]:
    s = MetricsServer()
    yield s
    s.close()


def _run(tmp_path: Path, monkeypatch, metrics: MetricsServer | None, **workload: object) -> RunStore:
    """A whole run on two loopback chat servers; /metrics from `metrics` (per phase and arm), or none."""
    key = "gab-test-" + secrets.token_urlsafe(18)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    phase = {"now": "observe"}
    if metrics is not None:  # a fresh page sequence per phase: idle at its start, busy after
        monkeypatch.setattr(sm, "metrics_url", lambda ep: f"{metrics.url}/ok-{phase['now']}-{ep.arm}/metrics")
    with servers(sb, "healthy", delay_s=DELAY_S) as (control, cand):
        cfg = sb.config("load", control.url, cand.url, size=4, observe_size=2,
                        metrics_interval_s=0.2 if metrics is not None else 0, **workload)
        store = RunStore.create(cfg, "load-" + secrets.token_hex(3))
        phases.start_endpoints(cfg, store, log=sb.log)
        try:
            for phase["now"] in ("observe", "ab"):
                phases.run_requests(cfg, store, phase["now"])
        finally:
            phases.teardown(store, log=sb.log)
    phases.evaluate_run(store)
    phases.decide_run(store)
    return store


def _lag_figures(lags_ms: list[float]) -> tuple[float, float, float]:
    """p50, p99 (linear interpolation, numpy's default) and max."""
    return (statistics.median(lags_ms), statistics.quantiles(lags_ms, n=100, method="inclusive")[98], max(lags_ms))


def test_an_open_loop_report_shows_the_load_as_offered_and_the_observe_phase_servers(tmp_path, monkeypatch, metrics_server):
    store = _run(tmp_path, monkeypatch, metrics_server,
                 load={"ab": {"profile": "poisson", "rate": RATE, "max_in_flight": CAP, "count": PAIRS}})
    recs = store.journal("ab")
    assert len(recs) == 2 * (PAIRS + 1)  # both arms, the warm-up pair first on the same schedule
    assert all(r.scheduled_at is not None and r.send_lag_s is not None for r in recs)

    # the figures, from the records: one arrival per scheduled instant, sent at its first send
    first_send: dict[float, float] = {}
    for r in recs:
        first_send[r.scheduled_at] = min(first_send.get(r.scheduled_at, r.sent_at), r.sent_at)  # type: ignore[index]
    k = len(first_send)
    assert k == PAIRS + 1
    offered = (k - 1) / (max(first_send) - min(first_send))
    achieved = (k - 1) / (max(first_send.values()) - min(first_send.values()))
    lags = [r.send_lag_s * 1e3 for r in recs]  # type: ignore[operator]
    p50, p99, mx = _lag_figures(lags)
    late = sum(lag > 2.0 for lag in lags)
    # one request in flight, the candidate's >= DELAY_S: <= 1 / DELAY_S = 33 pairs/s go out, so the arrivals fall behind
    assert achieved < RATE / 2 and late > len(recs) / 2

    line = (f"Poisson {RATE:.3g} pairs/s offered (the schedule as drawn: {offered:.3g}/s), {achieved:.3g}/s achieved; "
            f"send lag p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {mx:.2f} ms ({late} of {len(recs)} requests more than "
            f"2 ms late); at most {CAP} in flight.")
    md = store.path("report.md").read_text()
    html = store.path("report.html").read_text()
    assert "## Load as offered (A/B phase)" in md and line in md
    assert 'id="offered-load"' in html and line in html
    assert md.index("## Load as offered") < md.index("## Latency, explained")
    assert html.index('id="offered-load"') < html.index('id="latency"')
    for arm in ("control", "candidate"):  # the per-arm table: its own requests' rate and lag
        mine = sorted((r for r in recs if r.arm == arm), key=lambda r: r.sent_at)
        arm_rate = (len(mine) - 1) / (mine[-1].sent_at - mine[0].sent_at)
        a50, a99, amx = _lag_figures([r.send_lag_s * 1e3 for r in mine])  # type: ignore[operator]
        row = f"| {arm} | {len(mine)} | {arm_rate:.3g} | {a50:.2f} ms | {a99:.2f} ms | {amx:.2f} ms |"
        assert row in md, row

    # the observe phase's scrapes (the candidate alone): its own, smaller table beside the A/B's
    assert set(store.metric_scrapes("observe")) == {"candidate"}
    assert "### Observe phase (the candidates alone, before the A/B)" in md
    assert 'id="server-time-observe-table"' in html
    queue_s = sample(BUSY, "vllm:request_queue_time_seconds_sum") / sample(BUSY, "vllm:request_queue_time_seconds_count")
    observe_md = md[md.index("### Observe phase"):]
    assert f"| candidate | 3 / 2 | {queue_s:.3f} |" in observe_md  # 3 finished on the busy page; 2 observe requests


def test_a_closed_loop_and_an_old_evaluation_render_without_the_lag_block(tmp_path, monkeypatch):
    store = _run(tmp_path, monkeypatch, None)
    assert all(r.scheduled_at is None for r in store.journal("ab"))
    md = store.path("report.md").read_text()
    html = store.path("report.html").read_text()
    concurrency = store.load_config().workload.concurrency
    for text in (md, html):
        assert f"Closed loop, {concurrency} in flight (all arms together)" in text
        assert "send lag p50" not in text and "pairs/s" not in text
    assert 'id="offered-load-table"' not in html
    assert "Observe phase" not in md  # nothing scraped (metrics_interval_s 0): no second table, no note

    # an evaluation written before offered_load existed: no block at all, and nothing fails
    ev = store.read_json("evaluation.json")
    for gone in ("offered_load", "server_metrics_observe"):
        ev.pop(gone)
    model = build_report(store.load_config(), ev, store.read_json("decision.json"), store.run_id)
    assert "Load as offered" not in render_markdown(model)
    assert 'id="offered-load"' not in render_html(model.with_records(store.records()))
