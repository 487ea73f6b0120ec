"""The rate sweep's report: sweep-report.html (one self-contained page, the look of report.html),
sweep.png (its figure, for places that show images but not HTML) and the markdown of the Prefect
artifact, all drawn from sweep.json (guided_ab/sweep.py).

What it shows: per arm, latency (p50 with its 95% interval, p90) and TTFT against the arrival rate,
the knee marked; achieved against target rate (on the diagonal while the arm keeps up); time per
output token; and, where the server exported /metrics, where its time went per request at each
rate (queue / prefill / decode, from the step's histogram deltas). Its own page, not a section of
report.html: a sweep is its own run, with no A/B and no decision.

matplotlib through plots.py's style and SVG writer (one look for every report).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guided_ab.reports.html_style import CSS
from guided_ab.reports.plots import _figure, _png, _style, _svg
from guided_ab.store import RunStore, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FILE = "sweep-report.html"
PNG = "sweep.png"
ARM_COLORS = ("#1d4ed8", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4b5563")
SPLIT_COLORS = {"queue": "#f59e0b", "prefill": "#6366f1", "decode": "#0d9488"}


def _colors(result: dict[str, Any]) -> dict[str, str]:
    return {arm: ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(result["arms"])}


def _q(st: dict[str, Any], metric: str, p: str) -> tuple[float | None, float | None, float | None]:
    q = st.get(metric, {}).get(p, {})
    return q.get("estimate"), q.get("ci_low"), q.get("ci_high")


def _curve(ax: Axes, result: dict[str, Any], metric: str, title: str, p90: bool) -> None:
    """p50 per rate with its interval (an unbounded side drawn to the point), p90 dashed, the knee."""
    colors = _colors(result)
    for arm, a in result["arms"].items():
        xs: list[float] = []
        est: list[float] = []
        lo: list[float] = []  # error bar lengths below / above; an unbounded side: drawn to the point
        hi: list[float] = []
        for st in a["steps"]:
            e, low, high = _q(st, metric, "p50")
            if e is not None:
                xs.append(st["target_rate"])
                est.append(e)
                lo.append(e - low if low is not None else 0.0)
                hi.append(high - e if high is not None else 0.0)
        if not xs:
            continue
        c = colors[arm]
        ax.errorbar(xs, est, yerr=[lo, hi], color=c, marker="o", ms=4, lw=1.6, capsize=3, label=f"{arm} p50 (95% CI)")
        if p90:
            q90 = [(st["target_rate"], _q(st, metric, "p90")[0]) for st in a["steps"] if _q(st, metric, "p90")[0] is not None]
            if q90:
                ax.plot(*zip(*q90), color=c, ls="--", lw=1, label=f"{arm} p90")
        _mark_knee(ax, a, c)
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")


def _mark_knee(ax: Axes, a: dict[str, Any], color: str) -> None:
    k = a.get("knee", {})
    if k.get("rate") is not None:
        ax.axvline(k["rate"], color=color, ls=":", lw=1.2)
        ax.annotate(f"knee {k['rate']:.3g}/s" + ("+" if k.get("at_least") else ""), (k["rate"], 0.03),
                    xycoords=("data", "axes fraction"), rotation=90, va="bottom", ha="right", color=color, fontsize=8)


def _throughput(ax: Axes, result: dict[str, Any]) -> None:
    colors = _colors(result)
    top = 0.0
    for arm, a in result["arms"].items():
        pts = [(st["target_rate"], st["achieved_rate"], st["offered_rate"]) for st in a["steps"] if st.get("achieved_rate") is not None]
        if pts:
            # offered: what the step's (Poisson) schedule really sent; a kept-up step has achieved = offered
            ax.plot([p[0] for p in pts], [p[2] for p in pts], color=colors[arm], marker="o", mfc="none", ms=5, lw=0.8,
                    ls=":", label=f"{arm} offered")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[arm], marker="o", ms=4, lw=1.6, label=f"{arm} achieved")
            top = max(top, *(max(p) for p in pts))
        m = a.get("saturation", {}).get("max_rate")
        if m:
            ax.axhline(m, color=colors[arm], ls="-.", lw=0.8, label=f"{arm} closed-loop maximum")
            top = max(top, m)
        _mark_knee(ax, a, colors[arm])
    if top:
        ax.plot([0, top * 1.05], [0, top * 1.05], color="#9ca3af", lw=0.8, ls="--", label="achieved = target")
    ax.set_xlabel("target rate (requests/s)")
    ax.set_ylabel("achieved (requests/s)")
    ax.set_title("Achieved vs target rate")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left")


def _split(ax: Axes, arm: str, a: dict[str, Any]) -> None:
    """Stacked mean queue / prefill / decode seconds per request at each rate (the server's view)."""
    rows = [(st["target_rate"], (st.get("server") or {}).get("mean_s") or {}) for st in a["steps"]]
    rows = [(r, m) for r, m in rows if any(m.get(k) is not None for k in SPLIT_COLORS)]
    ax.set_title(f"{arm}: server time per request")
    if not rows:
        ax.text(0.5, 0.5, "no server metrics", ha="center", va="center", transform=ax.transAxes, color="#6b7280")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    xs = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key, color in SPLIT_COLORS.items():
        vals = [m.get(key) or 0.0 for _, m in rows]
        ax.bar(xs, vals, bottom=bottom, color=color, label=key, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(xs, [f"{r:.2g}" for r, _ in rows])
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("seconds (mean per request)")
    ax.legend(loc="upper left")


def figure(result: dict[str, Any]) -> Figure:
    arms = list(result["arms"])
    fig = _figure(12.0, 7.2)
    top, bottom = fig.subfigures(2, 1)  # type: ignore[misc]  # two rows: an array of two SubFigures
    a, b, c = top.subplots(1, 3)
    _curve(a, result, "latency", "End-to-end latency vs rate", p90=True)
    _curve(b, result, "ttft", "Time to first token vs rate", p90=False)
    _throughput(c, result)
    axes = bottom.subplots(1, 1 + len(arms), squeeze=False)[0]
    _curve(axes[0], result, "tpot", "Time per output token vs rate", p90=False)
    for ax, arm in zip(axes[1:], arms):
        _split(ax, arm, result["arms"][arm])
    return fig


# -- the page --------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _n(x: Any, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ci(q: dict[str, Any]) -> str:
    if not q or q.get("estimate") is None:
        return "n/a"
    lo = "-inf" if q.get("ci_low") is None else f"{q['ci_low']:.3g}"
    hi = "unbounded" if q.get("ci_high") is None else f"{q['ci_high']:.3g}"
    return f"{q['estimate']:.3g} <span class=\"ci\">[{lo}, {hi}]</span>"


def knee_text(arm: str, a: dict[str, Any]) -> str:
    k = a.get("knee", {})
    m = a.get("saturation", {}).get("max_rate")
    if k.get("rate") is None:
        return f"{arm}: no knee ({k.get('why', 'no data')}); closed-loop maximum {_n(m)}/s"
    return (f"{arm}: knee at {k['rate']:.3g} requests/s{' or more' if k.get('at_least') else ''} (achieved "
            f"{_n(k.get('achieved_rate'))}/s, p50 latency {_n(k.get('latency_p50_s'))} s); closed-loop maximum "
            f"{_n(m)}/s. {k.get('why', '')}")


def step_rows(a: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for st in a["steps"]:
        srv = (st.get("server") or {}).get("mean_s") or {}
        succ = st.get("success") or {}
        lag = st.get("send_lag_ms") or {}
        rows.append({
            "step": str(st["step"]), "target/s": _n(st["target_rate"]), "offered/s": _n(st.get("offered_rate")),
            "achieved/s": _n(st.get("achieved_rate")), "requests": f"{st['requests']}/{st.get('planned')}",
            "success": "n/a" if succ.get("estimate") is None else f"{succ['estimate']:.0%}",
            "latency p50": _ci(st["latency"]["p50"]), "p90": _ci(st["latency"]["p90"]), "p99": _ci(st["latency"]["p99"]),
            "TTFT p50": _ci(st["ttft"]["p50"]), "TPOT p50": _ci(st["tpot"]["p50"]),
            "send lag p99 ms": _n(lag.get("p99")),
            "server queue / prefill / decode s": " / ".join(_n(srv.get(k)) for k in SPLIT_COLORS) if srv else "n/a",
            "sustained": "yes" if st.get("sustained") else f"no: {st.get('why_not')}",
        })
    return rows


def _table(rows: list[dict[str, str]], tid: str) -> str:
    if not rows:
        return "<p class=\"muted\">No ladder step has run yet.</p>"
    raw = {"latency p50", "p90", "p99", "TTFT p50", "TPOT p50"}
    head = "".join(f"<th>{_e(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{v if c in raw else _e(v)}</td>" for c, v in r.items()) + "</tr>" for r in rows)
    return f"<div class=\"tablewrap\"><table id=\"{tid}\" data-testid=\"{tid}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def render(result: dict[str, Any], svg: str) -> str:
    s = result["settings"]
    cards = "".join(
        f"<div class=\"card\" style=\"border-top-color:{c}\" data-testid=\"knee-{_e(arm)}\"><div class=\"card-h\"><b>{_e(arm)}</b>"
        f"<span class=\"role\">{_e(a['backend'])}</span></div><p>{_e(knee_text(arm, a))}</p></div>"
        for (arm, a), c in zip(result["arms"].items(), _colors(result).values()))
    tables = "".join(f"<h3>{_e(arm)} ({_e(a['backend'])}): ladder "
                     f"{_e(', '.join(f'{r:.3g}' for r in a['ladder']))} requests/s</h3>{_table(step_rows(a), f'steps-{arm}')}"
                     for arm, a in result["arms"].items())
    ladder = (f"rates {', '.join(f'{r:g}' for r in s['rates'])}" if s.get("rates") else
              f"{s['steps']} rates from {s['low']:g} to {s['high']:g} x the closed-loop maximum")
    per_step = f"{s['count']} arrivals" if s.get("count") else f"{s.get('duration_s') or 30:g} s (at least {s['min_requests']} arrivals)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Rate sweep {_e(result['name'])} ({_e(result['run_id'])})</title><style>{CSS}</style></head>
<body><main data-testid="sweep-report" data-run-id="{_e(result['run_id'])}">
<header><div class="eyebrow">guided-ab rate sweep</div><h1>{_e(result['name'])}</h1>
<p class="muted">run <code>{_e(result['run_id'])}</code>; arms measured one at a time: saturation (closed loop,
{s['saturation_concurrency']} in flight, {s['saturation_requests']} requests), then {_e(ladder)}, {_e(s['profile'])} arrivals,
{_e(per_step)} per step, at most {s['max_in_flight']} in flight.</p></header>
<section id="knees" data-testid="knees"><h2>The knee per arm</h2><div class="cards">{cards}</div>
<p class="muted small">A step is sustained when it achieves at least {s['knee_achieved_share']:.0%} of its offered rate and
its p50 latency stays within {s['knee_latency_factor']:g} x the lowest rate's; the knee is the highest rate up to which
every step is sustained (pre-registered in the config's <code>sweep</code> block).</p></section>
<section id="curves" data-testid="curves"><h2>Latency, throughput and the server's time against the rate</h2>
<figure class="plot" id="plot-sweep" data-testid="plot-sweep">{svg}<figcaption>Top: p50 with its 95% interval (bars; an
unbounded side is drawn to the point) and p90 (dashed) per arrival rate, the knee dotted; achieved against target rate
(hollow: the rate the step's schedule really offered; achieved meets it while the arm keeps up; dash-dot: its closed-loop maximum). Bottom: time per output token; where the
server exported /metrics, its mean time per request spent queued, in prefill and in decode at each rate.</figcaption></figure></section>
<section id="steps" data-testid="steps"><h2>Every step</h2>{tables}</section>
<section id="method"><h2>How the numbers are made</h2><p class="small">{_e(result['method'])}</p></section>
<footer>guided-ab sweep report. Data: <a href="sweep.json">sweep.json</a>, <a href="records/">records/</a>, metrics/.</footer>
</main></body></html>
"""


def markdown(result: dict[str, Any]) -> str:
    """The Prefect artifact: the knees and one table per arm."""
    out = [f"# Rate sweep {result['name']} ({result['run_id']})", ""]
    out += [f"- {knee_text(arm, a)}" for arm, a in result["arms"].items()]
    for arm, a in result["arms"].items():
        out += ["", f"## {arm} ({a['backend']})", "",
                "| step | target/s | achieved/s | success | latency p50 s | p99 s | TTFT p50 s | queue / prefill / decode s | sustained |",
                "|---|---|---|---|---|---|---|---|---|"]
        for st in a["steps"]:
            srv = (st.get("server") or {}).get("mean_s") or {}
            succ = (st.get("success") or {}).get("estimate")
            out.append(f"| {st['step']} | {_n(st['target_rate'])} | {_n(st.get('achieved_rate'))} | "
                       f"{'n/a' if succ is None else f'{succ:.0%}'} | {_n(st['latency']['p50']['estimate'])} | "
                       f"{_n(st['latency']['p99']['estimate'])} | {_n(st['ttft']['p50']['estimate'])} | "
                       f"{' / '.join(_n(srv.get(k)) for k in SPLIT_COLORS) if srv else 'n/a'} | "
                       f"{'yes' if st.get('sustained') else 'no'} |")
    return "\n".join(out) + "\n"


def write(store: RunStore, result: dict[str, Any]) -> Path:
    """sweep-report.html and sweep.png in the run store; a figure that fails becomes a note on the page."""
    try:
        with _style():
            fig = figure(result)
            svg = _svg(fig, "sweep", "latency, TTFT and achieved rate against the arrival rate per arm; the server's time split")
            fig.set_layout_engine("none")  # the PNG reuses the layout just computed
            atomic_write_bytes(store.path(PNG), _png(fig, dpi=100))
    except Exception as err:  # noqa: BLE001 - the page must survive a bad plot
        svg = f"<p class=\"muted\">(plot unavailable: {_e(err)})</p>"
    p = store.path(FILE)
    atomic_write_text(p, render(result, svg))
    return p
