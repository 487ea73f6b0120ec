"""The HTML report of a run: `runs/<run_id>/report.html`, one self-contained file.

No remote scripts, styles, fonts or images: the CSS is inline (html_style.py) and every plot is an
inline SVG drawn with matplotlib (plots.py). This module turns the report model into the page;
files.py writes it, with the key-plot PNGs, into the run directory.

What the report shows, top to bottom (element ids in brackets, for people and the browser test):
decision banner with the reasons [decision]; per-arm key numbers [arms]; pre-registered criteria
with estimates, intervals and margins [criteria]; the A/B phase's load as offered (profile, offered
and achieved rate, send lag; only in evaluations that have it) [offered-load]; latency CDFs per arm, end-to-end and TTFT
[plot-latency-cdf]; latency per container when an arm had several (Modal replicas)
[replicas-table]; where each server's time went (queue, prefill, decode) beside the client's view,
and its requests running/waiting and KV-cache use over time, from its /metrics [server-metrics];
outcome classes per arm [plot-outcomes] and per schema subset
[plot-subset-failures]; resolved backend per arm and phase [plot-backend] and per schema
[schema-backends]; latency over the run's time per arm, the drift check [plot-drift]; cost per
arm and per 1k successful requests [cost]; validity gates [gates]; settings [settings].
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from guided_ab.reports.format import interval_parts, num
from guided_ab.reports.html_style import CSS
from guided_ab.reports.model import (
    OBSERVE_SERVER_METRICS,
    OBSERVE_SERVER_METRICS_NOTE,
    OFFERED_LOAD_NOTE,
    REPLICAS_NOTE,
    SERVER_METRICS_NOTE,
    ReportModel,
    dig,
    explain_rows,
    interval_label,
    observe_server_notes,
    offered_load,
    offered_load_line,
    offered_load_rows,
    replica_rows,
    server_metrics_notes,
    server_time_rows,
)
from guided_ab.reports.plots import Rendered, render_all

VERDICT_CLASS = {"switch": "v-switch", "keep": "v-keep", "inconclusive": "v-inconclusive", "invalid": "v-invalid"}
CRIT_CLASS = {"met": "ok", "not met": "bad", "unclear": "warn", "info": "info"}


def render_html(m: ReportModel, plots: Mapping[str, Rendered] | None = None) -> str:
    """The report page as a string; `plots` are the drawn plots (drawn here, without PNGs, if not given)."""
    p = dict(plots) if plots is not None else render_all(m, png=False)
    sections = [
        _header(m),
        _banner(m),
        _arm_cards(m),
        _criteria(m),
        *([_section("offered-load", "Load as offered (A/B phase)", _offered_load(m))] if offered_load(m.evaluation) else []),
        _section("latency", "Latency distributions", _latency(m, p)),
        *([_section("replicas", "Per-replica latency: containers of one arm", _replicas(m))] if m.replicas else []),
        _section("server-metrics", "Where the servers' time went: their own /metrics", _server_metrics(m, p)),
        _section("failures", "Where failures come from", _failures(m, p)),
        _section("workload-problems", "Workload problems: refused for the workload's own sake, not the backends'",
                 _workload_problems(m.evaluation)),
        _section("backends", "What the server chose: resolved structured-output backend", _backends(m, p)),
        _section("drift", "Requests over time: drift check", _drift(m, p)),
        _section("cost-section", "Cost", _cost(m, p)),
        _section("validity", "Validity gates", _gates(m.evaluation)),
        _section("settings-section", "Settings and thresholds", _settings(m.evaluation, m.decision)),
    ]
    title = f"{m.cfg.name}: {m.summary.verdict_text}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)} ({_e(m.run_id)})</title><style>{CSS}</style></head>"
        f"<body><main data-testid=\"report\" data-run-id=\"{_e(m.run_id)}\">"
        + "\n".join(sections)
        + f"<footer>guided-ab report, generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}. "
        "Data: <a href=\"evaluation.json\">evaluation.json</a>, <a href=\"decision.json\">decision.json</a>, "
        "<a href=\"records/\">records/</a>. How to read it: docs/report.md in the guided-ab repository.</footer>"
        "</main></body></html>\n"
    )


# -- small HTML helpers ----------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _workload_problems(ev: Mapping[str, Any]) -> str:
    """Requests the server refused for what the workload asked (prompt over the context, a bad
    parameter): apart from the backends' failures, excluded from the comparison, with what counting
    them would change, and the pre-flight count (evaluation's `workload_problems`, `preflight`)."""
    wp = ev.get("workload_problems") or {}
    out = []
    if wp.get("pairs"):
        classes = ", ".join(f"{k} {v}" for k, v in sorted(wp.get("by_outcome", {}).items()))
        out.append(f"<p><b>{wp['pairs']} of {wp['of_pairs']} A/B pairs ({wp['share']:.1%})</b> were refused for a reason "
                   f"unrelated to structured output ({_e(classes)}; backend attribution <code>none</code>): excluded from "
                   "the comparison, no backend is blamed for them. Counting them as failures would give:</p>")
        rows = [{"arm": arm, "success rate (excluded)": _pct(wp.get("success_rate_excluded", {}).get(arm)),
                 "success rate (counted as failures)": _pct(wp.get("success_rate_if_included", {}).get(arm))}
                for arm in wp.get("success_rate_excluded", {})]
        out.append(_table(rows, "workload-problems-table"))
        ids = wp.get("schemas", [])
        out.append(f"<p class=\"muted small\">Requests: {_e(', '.join(ids[:20]))}{' ...' if len(ids) > 20 else ''}</p>")
    else:
        out.append("<p class=\"muted\">None: every A/B request reached the backends.</p>")
    pre = ev.get("preflight") or {}
    if pre.get("counted"):
        too_long = len(pre.get("too_long", []))
        how = (f"dropped and replaced: {', '.join(pre['dropped'])}" if pre.get("dropped")
               else f"policy {pre.get('policy', 'keep')}")
        out.append(f"<p>Pre-flight: {pre['counted']} prompts counted with the served model's tokenizer; {too_long} could "
                   f"not fit max_model_len {_e(pre.get('max_model_len'))} - max_tokens ({_e(how)}).</p>")
    return "".join(out)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.1%}"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id=\"{sid}\" data-testid=\"{sid}\"><h2>{_e(title)}</h2>{body}</section>"


def _table(rows: list[dict], tid: str = "", cls: str = "", raw: frozenset[str] = frozenset()) -> str:
    if not rows:
        return "<p class=\"muted\">none</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{r[c] if c in raw else _e(r[c])}</td>" for c in cols) + "</tr>" for r in rows
    )
    attrs = f" id=\"{tid}\" data-testid=\"{tid}\"" if tid else ""
    return f"<div class=\"tablewrap\"><table{attrs} class=\"{cls}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _badge(text: str, cls: str) -> str:
    return f"<span class=\"badge {cls}\">{_e(text)}</span>"


def _iv(d: Mapping[str, Any] | None, fmt: str = "{:.2f}") -> str:
    """An evaluation interval, the bounds muted: `0.95 <span class="ci">[0.86, 1.05]</span>`."""
    est, ci = interval_parts(d, fmt)
    return est if ci is None else f"{est} <span class=\"ci\">{ci}</span>"


def _plot(r: Rendered, caption: str = "") -> str:
    """A drawn plot as a figure with its caption; a note where it has no data or failed."""
    pid, label = r.plot.pid, r.plot.label
    if r.error is not None:
        return f"<p class=\"muted\" id=\"{pid}\" data-testid=\"{pid}\">{_e(label)}: plot unavailable ({_e(r.error)})</p>"
    if r.svg is None:
        return f"<p class=\"muted\" id=\"{pid}\" data-testid=\"{pid}\">{_e(label)}: no data</p>"
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure id=\"{pid}\" data-testid=\"{pid}\" class=\"plot\">{r.svg}{cap}</figure>"


# -- sections --------------------------------------------------------------------------------------
def _header(m: ReportModel) -> str:
    cfg, data = m.cfg, m.records
    arms = []
    for a in cfg.arms:
        arms.append(f"<li><b style=\"color:inherit\">{_e(a.name)}</b> <span class=\"muted\">({_e(a.role)})</span>: "
                    f"backend <code>{_e(a.backend)}</code>, {_e(a.target)}, model <code>{_e(a.model)}</code></li>")
    decided = m.decision.get("decided_at")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(decided)) if isinstance(decided, (int, float)) else "n/a"
    wl = cfg.workload
    return (
        "<header id=\"header\" data-testid=\"header\">"
        f"<div class=\"eyebrow\">guided-ab experiment report</div><h1>{_e(cfg.name)}</h1>"
        f"<p class=\"muted\">{_e(cfg.description.strip())}</p>"
        f"<div class=\"meta\"><div><span>run</span><code>{_e(m.run_id)}</code></div>"
        f"<div><span>decided</span>{_e(when)}</div>"
        f"<div><span>pairs (A/B)</span>{m.summary.n_pairs}</div>"
        f"<div><span>workload</span>{_e(wl.suite)}{(' / ' + _e(', '.join(wl.subsets))) if wl.subsets else ''}, "
        f"{wl.size} schemas × {wl.repeats}, {wl.observe_size} observe</div>"
        f"<div><span>records</span>{len(data.all)} ({len(data.ab)} measured A/B)</div></div>"
        f"<ul class=\"arms-list\">{''.join(arms)}</ul>"
        + "".join(f"<p class=\"hypothesis\" data-testid=\"hypothesis\">{_e(h)}</p>" for h in m.summary.hypotheses)
        + "</header>"
    )


def _banner(m: ReportModel) -> str:
    dec, ev, s = m.decision, m.evaluation, m.summary
    verdict = s.verdict
    reasons = "".join(f"<li>{_e(r)}</li>" for r in s.reasons) or "<li>no reasons recorded</li>"
    extra = ""
    if verdict == "inconclusive":
        mde = dec.get("mde") or {}
        parts = []
        if mde.get("success_diff") is not None:
            parts.append(f"success difference ±{mde['success_diff']:.1%}")
        if mde.get("latency_p50_ratio") is not None:
            parts.append(f"p50 latency ratio change ±{mde['latency_p50_ratio']:.1%}")
        need = dec.get("pairs_needed")
        extra = (f"<p class=\"need\">{'About <b>' + _e(need) + '</b> more pairs would settle it. ' if need else ''}"
                 f"Smallest effect detectable now: {_e(', '.join(parts) or 'n/a')}.</p>")
    overridden = dec.get("overridden") or {}
    if overridden:
        extra += ("<p class=\"need\">Thresholds changed after the run (the config stays the pre-registration): "
                  f"<code>{_e(overridden)}</code></p>")
    return (
        f"<section id=\"decision\" data-testid=\"decision\" data-verdict=\"{_e(verdict)}\" "
        f"class=\"banner {VERDICT_CLASS.get(verdict, 'v-invalid')}\">"
        f"<div class=\"verdict\"><span class=\"vlabel\">decision</span><span class=\"vtext\">{_e(s.verdict_text)}</span></div>"
        f"<div class=\"serve\">serve <b>{_e(s.serve)}</b> · control {_e(s.control)} · "
        f"candidate{'s' if len(s.candidates) > 1 else ''} {_e(', '.join(s.candidates))}"
        f"{'' if ev.get('valid', True) else ' · <b>validity gates failed</b>'}</div>"
        f"<ul class=\"reasons\">{reasons}</ul>{extra}</section>"
    )


def _arm_cards(m: ReportModel) -> str:
    cards = []
    for arm in m.arms:
        a = m.arm_result(arm)
        if a is None:
            continue
        be = dig(a, "backend", "counts") or {}
        total = sum(be.values()) or 1
        be_txt = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(be.items(), key=lambda kv: -kv[1])) or "n/a"
        fails = {k: v for k, v in (a.get("outcomes") or {}).items() if k != "success" and v}
        cards.append(
            f"<div class=\"card\" data-arm=\"{_e(arm)}\" style=\"border-top-color:{m.colors.get(arm, '#111')}\">"
            f"<div class=\"card-h\"><b>{_e(arm)}</b> <span class=\"muted\">{_e(a.get('role'))} · "
            f"<code>{_e(a.get('configured_backend'))}</code> · n={_e(a.get('n'))}</span></div>"
            "<dl>"
            f"<dt>success</dt><dd>{_iv(dig(a, 'success', 'rate'), '{:.1%}')}</dd>"
            f"<dt>latency p50</dt><dd>{_iv(dig(a, 'latency', 'p50'))} s</dd>"
            f"<dt>latency p95</dt><dd>{_iv(dig(a, 'latency', 'p95'))} s</dd>"
            f"<dt>TTFT p50</dt><dd>{_iv(dig(a, 'ttft', 'p50'))} s</dd>"
            f"<dt>CV</dt><dd>{_iv(a.get('cv') or dig(a, 'latency', 'cv'))}</dd>"
            f"<dt>backend used</dt><dd>{_e(be_txt)}</dd>"
            f"<dt>failures</dt><dd>{_e(', '.join(f'{k} {v}' for k, v in sorted(fails.items())) or 'none')}</dd>"
            f"<dt>cost / 1k success</dt><dd>{num(dig(a, 'cost', 'per_1k_success'), '${:,.4f}')}</dd>"
            "</dl></div>"
        )
    details = _table(m.summary.arm_rows, "arms-table")
    return (
        "<section id=\"arms\" data-testid=\"arms\"><h2>Arms at a glance</h2>"
        "<p class=\"muted\">A/B phase, warm-ups excluded; 95% intervals in brackets.</p>"
        f"<div class=\"cards\">{''.join(cards)}</div>"
        f"<details><summary>as a table</summary>{details}</details></section>"
    )


def _crit_fmt(name: str) -> Callable[[Any], str]:
    if name.startswith("success") or name == "explain_truncation_diff":
        return lambda x: num(x, "{:+.1%}")
    if name == "backend_share":
        return lambda x: num(x, "{:.1%}")
    if name == "cost_per_1k_success":
        return lambda x: num(x, "${:,.4f}")
    return lambda x: num(x, "{:.3f}")


def _reference(name: str) -> float | None:
    if name.startswith("success") or name == "explain_truncation_diff":
        return 0.0
    if name.startswith(("latency", "variability", "explain_", "cost_saving")):
        return 1.0
    return None


def _interval_svg(c: Mapping[str, Any]) -> str:
    """A tiny hand-drawn interval sketch (estimate, CI, margin) for one criterion row."""
    lo, hi, est, margin = c.get("ci_low"), c.get("ci_high"), c.get("estimate"), c.get("margin")
    ref = _reference(str(c.get("name", "")))
    band = None
    if c.get("name") == "latency_equivalence" and margin is not None:
        band = (1 / (1 + margin), 1 + margin)  # its margin is relative: the TOST bounds
        margin = None
    pts = [v for v in (lo, hi, est, margin, ref, *(band or ())) if isinstance(v, (int, float)) and math.isfinite(v)]
    if est is None or not pts:
        return ""
    a, b = min(pts), max(pts)
    pad = (b - a) * 0.12 or abs(a) * 0.1 or 0.1
    a, b = a - pad, b + pad
    W, H = 170, 22

    def x(v: float) -> float:
        return 4 + (W - 8) * (v - a) / (b - a)

    parts = [f"<svg class=\"iv\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" "
             f"aria-label=\"interval\"><line x1=\"4\" x2=\"{W - 4}\" y1=\"{H - 3}\" y2=\"{H - 3}\" stroke=\"#e5e7eb\"/>"]
    if ref is not None:
        parts.append(f"<line x1=\"{x(ref):.1f}\" x2=\"{x(ref):.1f}\" y1=\"2\" y2=\"{H - 2}\" stroke=\"#9ca3af\" stroke-width=\"1\"/>")
    for mg in ([margin] if margin is not None else list(band or ())):
        parts.append(f"<line x1=\"{x(mg):.1f}\" x2=\"{x(mg):.1f}\" y1=\"1\" y2=\"{H - 1}\" stroke=\"#dc2626\" "
                     "stroke-width=\"1.5\" stroke-dasharray=\"3 2\"><title>margin</title></line>")
    color = {"met": "#15803d", "not met": "#b91c1c", "unclear": "#b45309"}.get(str(c.get("verdict")), "#374151")
    if lo is not None and hi is not None:
        parts.append(f"<line x1=\"{x(lo):.1f}\" x2=\"{x(hi):.1f}\" y1=\"{H / 2}\" y2=\"{H / 2}\" stroke=\"{color}\" stroke-width=\"3\" "
                     "stroke-linecap=\"round\"/>")
    parts.append(f"<circle cx=\"{x(est):.1f}\" cy=\"{H / 2}\" r=\"4\" fill=\"white\" stroke=\"{color}\" stroke-width=\"2\"/></svg>")
    return "".join(parts)


def _criteria(m: ReportModel) -> str:
    rows = []
    label = interval_label(m.decision)
    sequential = m.decision.get("sequential") is not None
    for c in m.decision.get("criteria", []):
        name = str(c.get("name"))
        f = _crit_fmt(name)
        lo, hi = c.get("ci_low"), c.get("ci_high")
        verdict = str(c.get("verdict"))
        extra = []
        if c.get("p_holm") is not None:
            extra.append(f"p (Holm) {c['p_holm']:.3g}")
        if c.get("pvalue") is not None:
            extra.append(f"p {c['pvalue']:.3g}")
        if c.get("pairs_needed"):
            extra.append(f"~{c['pairs_needed']} more schemas")
        if c.get("adjusted_level") is not None and c.get("adjusted_ci_low") is not None:
            # the Bonferroni interval the rule judges a gain / a broken guardrail on
            extra.append(f"{c['adjusted_level']:.1%} interval [{f(c['adjusted_ci_low'])}, {f(c.get('adjusted_ci_high'))}]")
        if c.get("hypothesis"):
            extra.append(f"hypothesis {c['hypothesis']}")
        if c.get("note"):
            extra.append(str(c["note"]))
        row = {
            "criterion": f"<b>{_e(name)}</b> <span class=\"role\">{_e(c.get('role'))}</span>"
                         f"<div class=\"muted small\">{_e(c.get('metric', ''))}</div>",
            "candidate": _e(c.get("candidate")),
            "estimate": _e(f(c.get("estimate"))),
            label: _e(f"[{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "n/a"),
            "margin": _e(num(c.get("margin"), "±{:.0%}") if name == "latency_equivalence" else f(c.get("margin"))),
            "": _interval_svg(c),
            "verdict": _badge(verdict, CRIT_CLASS.get(verdict, "info")),
            "notes": _e("; ".join(extra)),
        }
        if len(m.summary.candidates) < 2:
            del row["candidate"]
        rows.append(row)
    cols = frozenset(rows[0]) if rows else frozenset()
    return (
        "<section id=\"criteria\" data-testid=\"criteria\"><h2>Decision criteria (pre-registered in the config)</h2>"
        "<p class=\"muted\">Guardrails must all be <i>met</i> (the whole interval on the good side of the red dashed "
        "margin) and one primary criterion must be met for a switch. A gain, or a guardrail clearly broken, is judged "
        "on the Bonferroni interval in the notes; a primary 'not met' rules out the minimal worthwhile gain (futility). "
        "Grey line: no difference. Dot: estimate, bar: 95% interval. Informational rows never change the verdict."
        + (" A sequential run: each interval is the last look's repeated confidence interval, valid at every look "
           "at once (alpha spent over the looks), so it is wider than a fixed-size one on the same pairs." if sequential else "")
        + "</p>"
        + _table(rows, "criteria-table", "criteria", raw=cols) + "</section>"
    )


def _latency(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    ev = m.evaluation
    rows = []
    for arm in m.arms:
        a = m.arm_result(arm)
        if a is None:
            continue
        for metric, label in (("latency", "end-to-end s"), ("ttft", "TTFT s"), ("tpot", "per output token s")):
            mt = a.get(metric) or {}
            rows.append({
                "arm": _e(arm), "metric": _e(label), "n": _e(mt.get("n")),
                "mean": _iv(mt.get("mean"), "{:.3f}"), "p50": _iv(mt.get("p50"), "{:.3f}"),
                "p95": _iv(mt.get("p95"), "{:.3f}"),
                "p99": _iv(mt.get("p99"), "{:.3f}") + (" <span class=\"muted\">(descriptive)</span>" if dig(mt, "p99", "descriptive") else ""),
            })
        fvr = a.get("first_vs_repeated") or {}
        if dig(fvr, "repeated", "n"):
            rows.append({
                "arm": _e(arm), "metric": "first request per schema vs repeated (p50 s)", "n": _e(dig(fvr, "first", "n")),
                "mean": "", "p50": f"{_iv(dig(fvr, 'first', 'p50'), '{:.3f}')} vs {_iv(dig(fvr, 'repeated', 'p50'), '{:.3f}')}",
                "p95": "", "p99": "",
            })
    comp_rows = []
    for cand, c in (ev.get("comparisons") or {}).items():
        lat = c.get("latency") or {}
        comp_rows.append({
            "candidate / control": _e(f"{cand} / {c.get('control')}"), "pairs": _e(lat.get("n_pairs")),
            "mean ratio": _iv(lat.get("ratio_mean"), "{:.3f}"), "p50 ratio": _iv(lat.get("ratio_p50"), "{:.3f}"),
            "p95 ratio": _iv(lat.get("ratio_p95"), "{:.3f}"),
            "Wilcoxon p": _e(num(dig(lat, "wilcoxon", "pvalue"), "{:.3g}")),
        })
    explain = explain_rows(ev)
    raw = frozenset({"arm", "metric", "n", "mean", "p50", "p95", "p99"})
    return (
        _plot(p["plot-latency-cdf"],
              "Share of answered requests finished (left) or first token seen (right) within x seconds. "
              "A curve further left is faster; a gap at the top is a tail. Dots: p50, squares: p95.")
        + "<h3>Per arm</h3>" + _table(rows, "latency-table", raw=raw)
        + "<h3>Paired ratios (same schema on both arms)</h3>"
        + _table(comp_rows, "ratio-table", raw=frozenset(comp_rows[0]) if comp_rows else frozenset())
        + "<h3>Why: slower computation or longer answers</h3><p class=\"muted\">Timeouts and connection errors count "
          "as latencies censored at the workload's timeout: quantiles past the censored share are lower bounds, means "
          "are restricted means.</p>" + _table(explain, "explain-table")
    )


def _replicas(m: ReportModel) -> str:
    """Per container of an arm served by several (A/B phase, warm-ups excluded); a slow one marked."""
    return (f"<p class=\"muted\">{_e(REPLICAS_NOTE)}</p>"
            + _table(replica_rows(m.replicas), "replicas-table"))


def _server_metrics(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    """The servers' time split beside the client's view, and their load over the A/B phase."""
    rows = server_time_rows(m.evaluation)
    notes = "".join(f"<p class=\"muted\">{_e(n)}</p>" for n in server_metrics_notes(m.evaluation))
    observe_rows = server_time_rows(m.evaluation, OBSERVE_SERVER_METRICS)
    observe = "".join(f"<p class=\"muted\">{_e(n)}</p>" for n in observe_server_notes(m.evaluation))
    if observe_rows:  # the candidates alone, before the A/B: a second, smaller table
        observe = ("<h3>Observe phase: the candidates alone, before the A/B</h3>"
                   f"<p class=\"muted\">{_e(OBSERVE_SERVER_METRICS_NOTE)}</p>"
                   + _table(observe_rows, "server-time-observe-table") + observe)
    if not rows:
        return notes + observe
    return (f"<p class=\"muted\">{_e(SERVER_METRICS_NOTE)}</p>" + _table(rows, "server-time-table") + notes
            + _plot(p["plot-server-load"], "Step lines between scrapes: what each server's gauges read at each scrape.")
            + observe)


def _offered_load(m: ReportModel) -> str:
    """The A/B phase's load as run: profile, offered and achieved rate, send lag (per arm for an open loop)."""
    block = offered_load(m.evaluation)
    if block is None:
        return ""
    rows = offered_load_rows(block)
    return (f"<p class=\"offered-load-line\" data-testid=\"offered-load-line\">{_e(offered_load_line(block))}</p>"
            + (f"<p class=\"muted\">{_e(OFFERED_LOAD_NOTE)}</p>" + _table(rows, "offered-load-table") if rows else ""))


def _failures(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    sub_rows = [
        {"subset": r["subset"], "arm": r["arm"], "requests": int(r["n"]), "failed": int(r["failed"]),
         "failure rate": f"{r['failure rate']:.1%}", "most common failure": r["top failure"] or "-"}
        for _, r in m.subsets.iterrows()
    ]
    err_rows = [{"arm": e.arm, "outcome": e.outcome, "count": e.count, "message": e.message} for e in m.errors]
    return (
        _plot(p["plot-outcomes"],
              "Every measured A/B request falls in exactly one class; success means JSON that validates against the schema.")
        + _plot(p["plot-subset-failures"],
                "Where failures come from: failure rate of each arm within each schema subset (largest subsets first).")
        + "<details open><summary>per subset and arm</summary>" + _table(sub_rows, "subset-table") + "</details>"
        + ("<details><summary>most frequent error messages</summary>" + _table(err_rows, "error-table") + "</details>"
           if err_rows else "")
    )


def _backends(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    ev = m.evaluation
    rows = []
    for arm in m.arms:
        b = dig(ev, "arms", arm, "backend") or {}
        if b:
            rows.append({"arm": _e(arm), "phase": "A/B", "configured": _e(dig(ev, "arms", arm, "configured_backend")),
                         "resolved": _e(", ".join(f"{k} {v}" for k, v in sorted((b.get("counts") or {}).items())) or "n/a"),
                         "expected": _e(b.get("expected")), "expected share [95% CI]": _iv(b.get("share"), "{:.1%}")})
    for arm, o in (dig(ev, "observe", "arms") or {}).items():
        rows.append({"arm": _e(arm), "phase": "observe", "configured": _e(dig(ev, "arms", arm, "configured_backend")),
                     "resolved": _e(", ".join(f"{k} {v}" for k, v in sorted((o.get("backend_counts") or {}).items())) or "n/a"),
                     "expected": _e(dig(ev, "arms", arm, "backend", "expected")),
                     "expected share [95% CI]": _iv(o.get("backend_share"), "{:.1%}")})
    per_schema, phases = [], "observe and A/B"
    for arm, sb in (dig(ev, "schema_backends") or {}).items():  # every schema a candidate was sent
        per_schema += [{"arm": arm, "schema": sid, "backend": b}
                       for b, ids in (sb.get("by_backend") or {}).items() for sid in ids]
    mixed = {a: sb.get("mixed") for a, sb in (dig(ev, "schema_backends") or {}).items() if sb.get("mixed")}
    if not per_schema:  # evaluations written before schema_backends existed
        phases = "observe phase"
        for arm, schemas in (dig(ev, "observe", "schema_backends") or {}).items():
            if isinstance(schemas, dict):
                per_schema += [{"arm": arm, "schema": s, "backend": b} for s, b in sorted(schemas.items())]
        mixed = {a: mx for a, mx in (dig(ev, "observe", "mixed_schemas") or {}).items() if mx}
    per_schema.sort(key=lambda r: (r["arm"], r["backend"], r["schema"]))
    schema_html = (
        f"<details id=\"schema-backends\" data-testid=\"schema-backends\"><summary>backend per schema "
        f"({phases}, {len(per_schema)} schemas)</summary>{_table(per_schema)}</details>"
        if per_schema else "<p class=\"muted\" id=\"schema-backends\" data-testid=\"schema-backends\">no structured requests</p>"
    )
    if mixed:
        schema_html += f"<p class=\"warn-text\">Schemas resolved to more than one backend: <code>{_e(mixed)}</code></p>"
    return (
        "<p class=\"muted\">vLLM reports no per-request backend; guided-ab asks the serving process itself, with the "
        "served vLLM's own selection functions, for every request. Under <code>auto</code> this is what the server "
        "really used.</p>"
        + _plot(p["plot-backend"])
        + _table(rows, "backend-table", raw=frozenset(rows[0]) if rows else frozenset()) + schema_html
    )


def _drift(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    rows = [{"arm": d.arm, "answered": d.answered, "p50 first third s": f"{d.p50_first_third:.3f}",
             "p50 last third s": f"{d.p50_last_third:.3f}",
             "change": f"{d.p50_last_third / d.p50_first_third - 1:+.1%}" if d.p50_first_third > 0 else "n/a",
             "Spearman rho (latency ~ order)": f"{d.spearman_rho:+.2f} (p {d.spearman_p:.2g})"}
            for d in m.drift]
    return (
        "<p class=\"muted\">Pairs are interleaved (ABBA), so a slow-down of the machine or server during the run "
        "should hit both arms alike. Diverging trends, or a trend within one arm, mean the comparison may not "
        "hold at another time.</p>"
        + _plot(p["plot-drift"],
                "Dots: successful requests; crosses: answered but failed (truncated, invalid JSON, schema violation); "
                "ticks on the time axis: requests without an answer (rejected, timeout, server or connection error).")
        + _table(rows, "drift-table")
    )


def _cost(m: ReportModel, p: Mapping[str, Rendered]) -> str:
    ev = m.evaluation
    held = {e.get("arm"): e for e in m.teardown.get("arms", [])}
    rows = []
    for arm in m.arms:
        c = dig(ev, "arms", arm, "cost")
        if c is None:
            continue
        h = held.get(arm, {})
        rows.append({
            "arm": arm, "held": f"{h['held_s'] / 60:.1f} min" if isinstance(h.get("held_s"), (int, float)) else "n/a",
            "cost USD": num(c.get("usd"), "${:,.4f}"), "successful requests": num(c.get("successful_requests"), "{}"),
            "USD per 1k successful": num(c.get("per_1k_success"), "${:,.4f}"),
        })
    ratios = [f"{cand}: cost ratio per 1k successful vs control {num(c.get('cost_ratio_per_1k_success'), '{:.3f}')}"
              for cand, c in (ev.get("comparisons") or {}).items()]
    note = ("<p class=\"muted\">Cost counts the time each endpoint was held (start to teardown) at its configured "
            "hourly price; all zero means the arms are priced at 0 (local servers).</p>")
    return (note + _table(rows, "cost", "cost") + _plot(p["plot-cost"])
            + "".join(f"<p class=\"muted\">{_e(r)}</p>" for r in ratios))


def _gates(ev: Mapping[str, Any]) -> str:
    rows = [{"gate": _e(g.get("name")),
             "result": _badge("skipped" if g.get("skipped") else ("passed" if g.get("passed") else "FAILED"),
                              "info" if g.get("skipped") else ("ok" if g.get("passed") else "bad")),
             "detail": _e(g.get("detail", ""))} for g in ev.get("gates", [])]
    return ("<p class=\"muted\">Checked before any statistic: a failed gate makes the experiment invalid, whatever "
            "the numbers say.</p>" + _table(rows, "gates", "gates", raw=frozenset({"gate", "result", "detail"})))


def _settings(ev: Mapping[str, Any], dec: Mapping[str, Any]) -> str:
    rows = [{"setting": k, "value": v} for k, v in (ev.get("settings") or {}).items()]
    rows += [{"setting": f"threshold {k}", "value": v} for k, v in (dec.get("thresholds") or {}).items()]
    return f"<details id=\"settings\" data-testid=\"settings\"><summary>{len(rows)} settings</summary>{_table(rows)}</details>"
