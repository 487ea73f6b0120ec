"""The monitoring window's report (monitor-report.html beside report.html): what promotion changed,
each monitoring run's own point (its pairs only) and the running repeated confidence interval over
the whole window so far, against the pre-registered margins, for the success difference and the
latency ratio (production / control); drift over the week is the spread of the points.

Its own page, not a section of report.html: the A/B report is final when the A/B decides, this one
grows by one run a day. matplotlib through plots.py's style and SVG writer (one look for both).
"""

from __future__ import annotations

import html
from typing import Any

from guided_ab.reports.plots import _figure, _pct_formatter, _style, _svg
from guided_ab.store import RunStore

FILE = "monitor-report.html"


def _panel(ax: Any, runs: list[dict], key: str, margin: float, neutral: float, pct: bool, title: str) -> None:
    xs = [r["run"] for r in runs]
    est = [r[key]["estimate"] for r in runs]
    lo = [r[key]["ci_low"] for r in runs]
    hi = [r[key]["ci_high"] for r in runs]
    finite = [(x, e, a, b) for x, e, a, b in zip(xs, est, lo, hi) if None not in (e, a, b)]
    if finite:
        fx, fe, fa, fb = zip(*finite)
        ax.errorbar(fx, fe, yerr=[[e - a for e, a in zip(fe, fa)], [b - e for e, b in zip(fe, fb)]], color="#1d4ed8",
                    marker="o", ms=4, lw=1.2, capsize=4, label="running estimate and interval (whole window so far)")
    pts = [(x, r["point"][key]) for x, r in zip(xs, runs) if r.get("point", {}).get(key) is not None]
    if pts:
        ax.scatter(*zip(*pts), color="#111827", marker="x", s=28, zorder=3, label="this run's own pairs")
    ax.axhline(margin, color="#dc2626", ls="--", lw=1, label="margin")
    ax.axhline(neutral, color="#6b7280", ls=":", lw=1)
    ax.set_xlabel("monitoring run")
    ax.set_xticks(xs)
    ax.set_title(title)
    if pct:
        ax.yaxis.set_major_formatter(_pct_formatter())
    ax.legend(loc="best")


def figure_svg(runs: list[dict], margins: dict[str, float]) -> str:
    with _style():
        fig = _figure(9.0, 3.4)
        a, b = fig.subplots(1, 2)
        _panel(a, runs, "success_diff", margins["success"], 0.0, True, "success difference (production - control)")
        _panel(b, runs, "latency_ratio", margins["latency_ratio"], 1.0, False, "latency ratio (production / control)")
        return _svg(fig, "monitor", "monitoring window: per-run points and the running interval against the margins")


def _fmt(iv: dict, pct: bool) -> str:
    def f(v: float | None) -> str:
        return "unbounded" if v is None else (f"{v:+.1%}" if pct else f"{v:.3f}")
    return f"{f(iv.get('estimate'))} [{f(iv.get('ci_low'))}, {f(iv.get('ci_high'))}]"


def render(promotion: dict[str, Any], monitoring: dict[str, Any]) -> str:
    runs = monitoring.get("runs", [])
    w = promotion["window"]
    esc = html.escape
    status = promotion.get("status", "?")
    verdict = monitoring.get("verdict") or "monitoring (no verdict yet)"
    rows = "".join(
        f"<tr><td>{r['run']}</td><td>{r['pairs']}</td><td>{r['information']:.2f}</td><td>{esc(_fmt(r['success_diff'], True))}</td>"
        f"<td>{esc(_fmt(r['latency_ratio'], False))}</td><td>{esc(r['verdict'])}</td></tr>" for r in runs)
    changes = "".join(f"<li>{esc(str(c['field']))}: {esc(str(c['from']))} &rarr; {esc(str(c['to']))}</li>"
                      for c in promotion.get("changes", []) if c["field"] != "modal")
    try:
        fig = figure_svg(runs, w["margins"]) if runs else "<p>No monitoring run yet.</p>"
    except Exception as err:  # noqa: BLE001 - the page must survive a bad plot
        fig = f"<p>(plot failed: {esc(str(err))})</p>"
    reason = runs[-1]["reason"] if runs else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitoring {esc(promotion['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#111827}}table{{border-collapse:collapse}}
td,th{{border:1px solid #d1d5db;padding:3px 8px;text-align:right}}svg{{width:100%;height:auto}}</style></head><body>
<h1>Monitoring window of run <code>{esc(promotion['run_id'])}</code>: {esc(verdict)}</h1>
<p>Promoted <b>{esc(promotion['serve'])}</b> over <b>{esc(promotion['control'])}</b>; status <b>{esc(status)}</b>.
{len(runs)} of {w['planned_runs']} monitoring runs, {w['pairs_per_run']} pairs each, {w['planned_pairs']} planned pairs;
margins: success {w['margins']['success']:+.1%}, latency ratio {w['margins']['latency_ratio']:.3f}.</p>
<ul>{changes}</ul>
<p>{esc(reason)}</p>
<h2>Running interval against the margins</h2>
{fig}
<h2>Runs</h2>
<table><tr><th>run</th><th>pairs so far</th><th>information</th><th>success difference (running interval)</th>
<th>latency ratio (running interval)</th><th>verdict</th></tr>{rows}</table>
<p><small>{esc(monitoring.get('method', ''))}</small></p>
</body></html>
"""


def write(store: RunStore) -> str:
    """Write monitor-report.html through the store (a directory or an object store); where it is."""
    promotion = store.read_json("promotion.json")
    monitoring = store.read_json("monitoring.json", default={})
    store.write_text(FILE, render(promotion, monitoring))
    return store.where(FILE)
