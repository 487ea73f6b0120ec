"""The report's plots: matplotlib figures drawn from the report model, as inline SVG for
report.html and, for the key plots, as small PNGs for places that show images but not HTML
(report.md links them, the Prefect markdown artifact embeds them as data URIs).

matplotlib is imported here only, lazily (it costs ~0.5 s): the rest of guided-ab never pays for
it. A plot that fails becomes a note on the page, never a failed report. `PLOTS` lists every
plot once: its element id, its label and, for a key plot, the PNG file written beside report.html.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from guided_ab.analysis.evaluation import ANSWERED_OUTCOMES
from guided_ab.records import OUTCOMES
from guided_ab.reports.model import ReportModel, dig, server_metrics_arms

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OUTCOME_COLORS = {
    "success": "#16a34a", "truncated": "#f59e0b", "schema_violation": "#dc2626", "invalid_json": "#db2777",
    "rejected": "#7c3aed", "server_error": "#7f1d1d", "timeout": "#64748b", "connection_error": "#92400e",
    "validation_timeout": "#a3a3a3", "validation_error": "#737373", "no_tool_call": "#b91c1c", "unknown_tool": "#991b1b",
    "context_overflow": "#0284c7", "invalid_request": "#0369a1",  # blues: the workload's problems, not a backend's
}
BACKEND_COLORS = {"guidance": "#0d9488", "xgrammar": "#6366f1", "outlines": "#d97706",
                  "lm-format-enforcer": "#be185d", "unknown": "#cbd5e1"}

RC: dict[str, Any] = {
    "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6, "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151",
    "xtick.color": "#4b5563", "ytick.color": "#4b5563", "legend.frameon": False, "legend.fontsize": 8,
    "font.family": ["DejaVu Sans", "sans-serif"], "axes.axisbelow": True,
    # labels hold server text (backend names): `$...$` in one must print as itself, not as mathtext
    "text.parse_math": False,
}


def _style(**extra: Any) -> AbstractContextManager[None]:
    """matplotlib's rc_context with the report's style (RC), plus `extra` settings."""
    import matplotlib

    rc: Any = {**RC, **extra}
    return matplotlib.rc_context(rc)


# -- figures ---------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.5 s to import

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _pct_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _ecdf(ax: Axes, values: np.ndarray, color: str, label: str, dashed: bool = False) -> None:
    x = np.sort(values)
    y = np.arange(1, x.size + 1) / x.size
    ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", color=color, lw=1.8, label=label,
            ls="--" if dashed else "-")


def latency_fig(m: ReportModel) -> Figure | None:
    """ECDFs of end-to-end latency and TTFT per arm; the legend's n, p50 and p95 are the evaluation's."""
    data = m.records
    if data.answered.empty:
        return None
    fig = _figure(9.0, 3.4)
    axes = fig.subplots(1, 2)
    for ax, col, metric, title in ((axes[0], "latency_s", "latency", "End-to-end latency"),
                                   (axes[1], "ttft_s", "ttft", "Time to first token")):
        vals_all = []
        for arm in data.arms:
            v = data.arm(data.answered, arm)[col].to_numpy(dtype=float)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size == 0:
                continue
            vals_all.append(v)
            color = m.colors.get(arm, "#111827")
            q = m.quantiles[metric][arm]
            n = q.n if q.n is not None else v.size
            if q.p50 is None or q.p95 is None:  # an arm the evaluation has no quantiles for
                _ecdf(ax, v, color, f"{arm}  n={n}")
                continue
            _ecdf(ax, v, color, f"{arm}  n={n}  p50 {q.p50:.2f}s  p95 {q.p95:.2f}s")
            ax.plot([q.p50], [0.5], "o", color=color, ms=4)
            ax.plot([q.p95], [0.95], "s", color=color, ms=4)
        if not vals_all:
            ax.text(0.5, 0.5, "no data (TTFT needs streamed requests)" if col == "ttft_s" else "no data",
                    ha="center", va="center", transform=ax.transAxes, color="#6b7280")
            ax.set_title(title)
            continue
        allv = np.concatenate(vals_all)
        if allv.max() / max(allv.min(), 1e-9) > 30:
            ax.set_xscale("log")
        for qq in (0.5, 0.95):
            ax.axhline(qq, color="#9ca3af", lw=0.7, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of requests ≤ x")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return fig


def outcomes_fig(m: ReportModel) -> Figure | None:
    data = m.records
    if data.ab.empty:
        return None
    arms = [a for a in data.arms if len(data.arm(data.ab, a))]
    fig = _figure(9.0, 0.75 + 0.55 * len(arms))
    ax = fig.subplots()
    present = [o for o in OUTCOMES if (data.ab["outcome"] == o).any()]
    left = np.zeros(len(arms))
    for o in present:
        counts = np.array([(data.arm(data.ab, a)["outcome"] == o).sum() for a in arms], dtype=float)
        totals = np.array([len(data.arm(data.ab, a)) for a in arms], dtype=float)
        share = counts / totals
        bars = ax.barh(arms, share, left=left, color=OUTCOME_COLORS.get(o, "#94a3b8"), label=o, height=0.6)
        for b, c, s in zip(bars, counts, share):
            if s >= 0.06:
                ax.text(b.get_x() + b.get_width() / 2, b.get_y() + b.get_height() / 2, f"{int(c)}",
                        ha="center", va="center", fontsize=8, color="white")
        left += share
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(_pct_formatter())
    ax.set_xlabel("share of A/B requests (labels: counts)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(arms) < 3 else -0.2), ncol=min(len(present), 8))
    ax.set_title("Outcome per request, by arm")
    return fig


def subset_fig(m: ReportModel) -> Figure | None:
    table = m.subsets
    if table.empty:
        return None
    subsets = table.groupby("subset")["n"].sum().sort_values(ascending=False).index.tolist()[:15]
    arms = [a for a in m.arms if (table["arm"] == a).any()]
    fig = _figure(9.0, 0.9 + 0.32 * len(subsets) * max(1, len(arms)) * 0.8)
    ax = fig.subplots()
    h = 0.8 / max(1, len(arms))
    y = np.arange(len(subsets))
    for i, arm in enumerate(arms):
        t = table[table["arm"] == arm].set_index("subset")
        rate = np.array([t["failure rate"].get(s, np.nan) for s in subsets], dtype=float)
        n = [t["n"].get(s, 0) for s in subsets]
        bars = ax.barh(y + i * h, np.nan_to_num(rate), height=h, color=m.colors.get(arm), label=arm)
        for b, r, k in zip(bars, rate, n):
            if np.isfinite(r):
                ax.text(b.get_width() + 0.01, b.get_y() + b.get_height() / 2, f"{r:.0%} of {int(k)}",
                        va="center", fontsize=7, color="#374151")
    ax.set_yticks(y + h * (len(arms) - 1) / 2, subsets)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.xaxis.set_major_formatter(_pct_formatter())
    ax.set_xlabel("failure rate (any outcome but success)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right")
    ax.set_title("Failure rate per schema subset")
    return fig


def backend_fig(m: ReportModel) -> Figure | None:
    rows = m.backend_mix
    if not rows:
        return None
    backends = sorted({b for _, c in rows for b in c}, key=lambda b: (b == "unknown", b))
    fig = _figure(9.0, 0.8 + 0.45 * len(rows))
    ax = fig.subplots()
    labels = [r[0] for r in rows]
    left = np.zeros(len(rows))
    for b in backends:
        counts = np.array([c.get(b, 0) for _, c in rows], dtype=float)
        share = counts / np.array([sum(c.values()) for _, c in rows], dtype=float)
        bars = ax.barh(labels, share, left=left, color=BACKEND_COLORS.get(b, "#94a3b8"), label=b, height=0.6)
        for bar, k, s in zip(bars, counts, share):
            if s >= 0.08:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, f"{s:.0%} ({int(k)})",
                        ha="center", va="center", fontsize=8, color="white" if b != "unknown" else "#374151")
        left += share
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(_pct_formatter())
    ax.set_xlabel("share of requests by backend the server resolved")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3 if len(rows) < 4 else -0.15), ncol=len(backends))
    ax.set_title("Resolved backend per arm and phase")
    return fig


def drift_fig(m: ReportModel) -> Figure | None:
    data = m.records
    ab = data.ab[np.isfinite(data.ab["sent_at"])]
    if ab.empty:
        return None
    t0 = float(ab["sent_at"].min())
    span = float(ab["sent_at"].max()) - t0
    unit, div = ("minutes", 60.0) if span > 180 else ("seconds", 1.0)
    fig = _figure(9.0, 3.2)
    ax = fig.subplots()
    for arm in data.arms:
        f = data.arm(ab, arm).sort_values("sent_at")
        if f.empty:
            continue
        c = m.colors.get(arm, "#111827")
        x = (f["sent_at"].to_numpy(dtype=float) - t0) / div
        lat = f["latency_s"].to_numpy(dtype=float)
        answered = f["outcome"].isin(ANSWERED_OUTCOMES).to_numpy() & np.isfinite(lat)
        ok = (f["outcome"] == "success").to_numpy() & answered
        bad = answered & ~ok
        none = ~answered
        ax.scatter(x[ok], lat[ok], s=10, color=c, alpha=0.55, lw=0, label=f"{arm} success")
        if bad.any():
            ax.scatter(x[bad], lat[bad], s=18, color=c, marker="x", lw=1, alpha=0.9, label=f"{arm} failed (answered)")
        if none.any():  # no answer (rejected, timeout, ...): a tick on the time axis
            ax.scatter(x[none], np.zeros(int(none.sum())), s=40, color=c, marker="|", lw=1.2,
                       transform=ax.get_xaxis_transform(), clip_on=False, label=f"{arm} no answer")
        if answered.sum() >= 5:
            w = max(3, int(answered.sum()) // 8)
            med = pd.Series(lat[answered]).rolling(w, center=True, min_periods=max(2, w // 2)).median()
            ax.plot(x[answered], med, color=c, lw=2, label=f"{arm} median of {w} neighbours")
    ax.set_xlabel(f"{unit} since the first A/B request")
    ax.set_ylabel("end-to-end latency, s")
    lat_all = ab.loc[ab["outcome"].isin(ANSWERED_OUTCOMES), "latency_s"].to_numpy(dtype=float)
    lat_all = lat_all[np.isfinite(lat_all) & (lat_all > 0)]
    if lat_all.size and lat_all.max() / max(lat_all.min(), 1e-9) > 30:
        ax.set_yscale("log")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Latency of every A/B request in send order")
    return fig


def cost_fig(m: ReportModel) -> Figure | None:
    ev = m.evaluation
    arms = [a for a in m.arms if dig(ev, "arms", a, "cost", "per_1k_success") is not None]
    vals = [float(dig(ev, "arms", a, "cost", "per_1k_success")) for a in arms]
    if not arms or not any(v > 0 for v in vals):
        return None
    fig = _figure(9.0, 0.9 + 0.4 * len(arms))
    ax = fig.subplots()
    bars = ax.barh(arms, vals, color=[m.colors.get(a) for a in arms], height=0.55)
    for b, v in zip(bars, vals):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" ${v:,.4f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("USD per 1,000 successful requests")
    ax.grid(axis="y", visible=False)
    ax.set_xlim(0, max(vals) * 1.3)
    ax.set_title("Cost per 1k successful requests")
    return fig


def server_load_fig(m: ReportModel) -> Figure | None:
    """Requests running and waiting, and KV-cache use, on each arm's server over the A/B phase
    (its /metrics scrapes: evaluation["server_metrics"], guided_ab/load/server_metrics.py)."""
    arms = {a: e["series"] for a, e in server_metrics_arms(m.evaluation).items() if (e.get("series") or {}).get("t")}
    if not arms:
        return None
    from matplotlib.ticker import MaxNLocator
    span = max(max(s["t"]) for s in arms.values())
    unit, div = ("minutes", 60.0) if span > 180 else ("seconds", 1.0)
    panels = (("running", "requests running"), ("waiting", "requests waiting"), ("kv_cache", "KV cache used"))
    fig = _figure(9.0, 4.6)
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (key, label) in zip(axes, panels):
        for arm, s in arms.items():
            t = np.asarray(s["t"], dtype=float) / div
            y = np.asarray([np.nan if v is None else float(v) for v in s.get(key, [])], dtype=float)
            if y.size == t.size and np.isfinite(y).any():
                ax.step(t, y, where="post", color=m.colors.get(arm, "#111827"), lw=1.6, label=arm)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    for ax in axes[:2]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # requests: whole numbers
    axes[2].yaxis.set_major_formatter(_pct_formatter())
    axes[2].set_xlabel(f"{unit} since the first scrape of the A/B phase")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title("What each server reported: requests running, waiting and KV-cache use")
    return fig


# -- the list of plots -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plot:
    pid: str  # element id in report.html
    label: str  # accessible name in the HTML, alt text of the PNG
    build: Callable[[ReportModel], Figure | None]  # None: no data to plot
    png: str | None = None  # key plots: the PNG written beside report.html


PLOTS: tuple[Plot, ...] = (
    Plot("plot-latency-cdf", "Latency CDFs per arm (end-to-end and TTFT)", latency_fig, png="latency_cdf.png"),
    Plot("plot-outcomes", "Outcome classes per arm", outcomes_fig, png="outcomes.png"),
    Plot("plot-subset-failures", "Failure rate per schema subset", subset_fig),
    Plot("plot-backend", "Resolved backend share per arm and phase", backend_fig),
    Plot("plot-drift", "Latency over time per arm", drift_fig),
    Plot("plot-cost", "Cost per 1k successful requests", cost_fig),
    Plot("plot-server-load", "Requests running and waiting, and KV-cache use, per server over the A/B phase", server_load_fig),
)
KEY_PLOTS: dict[str, str] = {p.png: p.label for p in PLOTS if p.png}  # PNG file name -> alt text


# -- rendering -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    """One plot, drawn: the SVG (and PNG for a key plot), or why there is none."""

    plot: Plot
    svg: str | None = None
    png: bytes | None = None
    error: str | None = None  # the plot failed: the exception's text; svg and error both None: no data


def _svg(fig: Figure, name: str, label: str) -> str:
    buf = io.StringIO()
    with _style(**{"svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # responsive: keep the viewBox, let CSS size it; unique ids per figure come from the hash salt
    esc = html.escape(label, quote=True)
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                  lambda mt: f'<svg{mt.group(1)} role="img" aria-label="{esc}" preserveAspectRatio="xMidYMid meet"',
                  text, count=1)
    return text


def _png(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def render(plot: Plot, m: ReportModel, *, png: bool = True) -> Rendered:
    """Draw one plot; a plotting failure is recorded in `error`, never raised."""
    try:
        with _style():
            fig = plot.build(m)
            if fig is None:
                return Rendered(plot)
            svg = _svg(fig, plot.pid, plot.label)
            fig.set_layout_engine("none")  # keep the layout just computed: the PNG reuses it
            data = _png(fig) if png and plot.png else None
    except Exception as err:  # noqa: BLE001 - the report must survive a bad plot
        return Rendered(plot, error=str(err))
    return Rendered(plot, svg=svg, png=data)


def render_all(m: ReportModel, *, png: bool = True) -> dict[str, Rendered]:
    """Every plot of PLOTS by element id; PNGs of the key plots too unless png=False."""
    return {p.pid: render(p, m, png=png) for p in PLOTS}
