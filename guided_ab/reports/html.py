"""The HTML report of a run: `runs/<run_id>/report.html`, one self-contained file.

No remote scripts, styles, fonts or images: the CSS is inline and every plot is an inline SVG
drawn with matplotlib (imported here only, lazily: the rest of guided-ab never pays for it).
Beside the HTML go two small PNGs of the key plots (`latency_cdf.png`, `outcomes.png`) for
places that show images but not HTML: report.md links them, and the Prefect markdown artifact
embeds them as data URIs.

What the report shows, top to bottom (element ids in brackets, for people and the browser test):
decision banner with the reasons [decision]; per-arm key numbers [arms]; pre-registered criteria
with estimates, intervals and margins [criteria]; latency CDFs per arm, end-to-end and TTFT
[plot-latency-cdf]; outcome classes per arm [plot-outcomes] and per schema subset
[plot-subset-failures]; resolved backend per arm and phase [plot-backend] and per schema
[schema-backends]; latency over the run's time per arm, the drift check [plot-drift]; cost per
arm and per 1k successful requests [cost]; validity gates [gates]; settings [settings].

Plots use the same rows as the statistics (evaluation.py): the A/B phase without warm-ups;
latency and TTFT over requests that got an answer.
"""

from __future__ import annotations

import html
import io
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis.evaluation import ANSWERED_OUTCOMES
from guided_ab.config import ExperimentConfig
from guided_ab.records import OUTCOMES, RECORD_COLUMNS
from guided_ab.reports.markdown import VERDICT_TEXT, arm_rows
from guided_ab.store import RunStore, atomic_write_bytes, atomic_write_text

KEY_PLOTS = ("latency_cdf.png", "outcomes.png")  # written beside report.html

ARM_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c")
OUTCOME_COLORS = {
    "success": "#16a34a", "truncated": "#f59e0b", "schema_violation": "#dc2626", "invalid_json": "#db2777",
    "rejected": "#7c3aed", "server_error": "#7f1d1d", "timeout": "#64748b", "connection_error": "#92400e",
}
BACKEND_COLORS = {"guidance": "#0d9488", "xgrammar": "#6366f1", "outlines": "#d97706",
                  "lm-format-enforcer": "#be185d", "unknown": "#cbd5e1"}
VERDICT_CLASS = {"switch": "v-switch", "keep": "v-keep", "inconclusive": "v-inconclusive", "invalid": "v-invalid"}
CRIT_CLASS = {"met": "ok", "not met": "bad", "unclear": "warn", "info": "info"}


# -- entry point -----------------------------------------------------------------------------------
def write_html_report(store: RunStore, cfg: ExperimentConfig, evaluation: dict, decision: dict) -> Path:
    """Write report.html (and the key-plot PNGs) into the run directory; returns the HTML path."""
    records = store.records()
    teardown = store.read_json("teardown.json", default={"arms": []})
    pngs: dict[str, bytes] = {}
    page = render_html(cfg, evaluation, decision, records, store.run_id, teardown=teardown, pngs=pngs)
    for name, data in pngs.items():
        atomic_write_bytes(store.path(name), data)
    out = store.path("report.html")
    atomic_write_text(out, page)
    return out


def render_html(cfg: ExperimentConfig, evaluation: dict, decision: dict, records: pd.DataFrame, run_id: str,
                *, teardown: dict | None = None, pngs: dict[str, bytes] | None = None) -> str:
    """The report page as a string. Key plots are also rendered as PNG into `pngs` if given."""
    arms = [evaluation.get("control") or cfg.control.name, *(evaluation.get("candidates") or [a.name for a in cfg.candidates])]
    arms = [a for a in arms if a]
    colors = {a: ARM_COLORS[i % len(ARM_COLORS)] for i, a in enumerate(arms)}
    data = _Data(records, arms)
    ctx = {"cfg": cfg, "ev": evaluation, "dec": decision, "data": data, "arms": arms, "colors": colors,
           "teardown": teardown or {"arms": []}, "pngs": pngs}
    sections = [
        _header(cfg, evaluation, decision, run_id, data),
        _banner(decision, evaluation),
        _arm_cards(ctx),
        _criteria(ctx),
        _section("latency", "Latency distributions", _latency(ctx)),
        _section("failures", "Where failures come from", _failures(ctx)),
        _section("backends", "What the server chose: resolved structured-output backend", _backends(ctx)),
        _section("drift", "Requests over time: drift check", _drift(ctx)),
        _section("cost-section", "Cost", _cost(ctx)),
        _section("validity", "Validity gates", _gates(evaluation)),
        _section("settings-section", "Settings and thresholds", _settings(evaluation, decision)),
    ]
    title = f"{cfg.name}: {VERDICT_TEXT.get(decision.get('verdict', ''), decision.get('verdict', '?'))}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)} ({_e(run_id)})</title><style>{CSS}</style></head>"
        f"<body><main data-testid=\"report\" data-run-id=\"{_e(run_id)}\">"
        + "\n".join(sections)
        + f"<footer>guided-ab report, generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}. "
        "Data: <a href=\"evaluation.json\">evaluation.json</a>, <a href=\"decision.json\">decision.json</a>, "
        "<a href=\"records/\">records/</a>. How to read it: docs/report.md in the guided-ab repository.</footer>"
        "</main></body></html>\n"
    )


# -- data ------------------------------------------------------------------------------------------
class _Data:
    """The rows the plots use, split once."""

    def __init__(self, records: pd.DataFrame | None, arms: list[str]):
        df = records if records is not None and len(records) else pd.DataFrame(columns=RECORD_COLUMNS)
        df = df.copy()
        for c in ("latency_s", "ttft_s", "sent_at"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        df["warmup"] = df["warmup"].fillna(False).astype(bool)
        df["backend"] = df["backend"].where(df["backend"].notna(), "unknown").astype(str)
        df["subset"] = df["subset"].where(df["subset"].notna(), "?").astype(str)
        self.all = df
        self.ab = df[(df["phase"] == "ab") & ~df["warmup"]]
        self.observe = df[(df["phase"] == "observe") & ~df["warmup"]]
        self.answered = self.ab[self.ab["outcome"].isin(ANSWERED_OUTCOMES)]
        extra = sorted(set(self.ab["arm"].astype(str)) - set(arms))
        self.arms = list(arms) + extra

    def arm(self, frame: pd.DataFrame, arm: str) -> pd.DataFrame:
        return frame[frame["arm"] == arm]


# -- small HTML helpers ----------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


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


def _num(x: Any, fmt: str = "{:.2f}", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _iv(d: dict | None, fmt: str = "{:.2f}") -> str:
    if not d or d.get("estimate") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None:
        return _num(d["estimate"], fmt)
    return f"{fmt.format(d['estimate'])} <span class=\"ci\">[{fmt.format(lo)}, {fmt.format(hi)}]</span>"


def _get(d: dict, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


# -- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.5 s to import

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


RC = {
    "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6, "axes.edgecolor": "#9ca3af", "axes.labelcolor": "#374151",
    "xtick.color": "#4b5563", "ytick.color": "#4b5563", "legend.frameon": False, "legend.fontsize": 8,
    "font.family": ["DejaVu Sans", "sans-serif"], "axes.axisbelow": True,
}


def _svg(fig, name: str, label: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**RC, "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # responsive: keep the viewBox, let CSS size it; unique ids per figure come from the hash salt
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                  lambda m: f'<svg{m.group(1)} role="img" aria-label="{_e(label)}" preserveAspectRatio="xMidYMid meet"',
                  text, count=1)
    return text


def _png(fig, dpi: int = 80) -> bytes:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _plot(pid: str, label: str, build: Callable[[], Any], caption: str = "", png: tuple[dict | None, str] | None = None) -> str:
    """An inline-SVG figure; a plotting failure becomes a note, never a failed report."""
    try:
        import matplotlib

        with matplotlib.rc_context(RC):
            fig = build()
            if fig is None:
                return f"<p class=\"muted\" id=\"{pid}\" data-testid=\"{pid}\">{_e(label)}: no data</p>"
            svg = _svg(fig, pid, label)
            fig.set_layout_engine("none")  # keep the layout just computed: the PNG reuses it
            if png and png[0] is not None:
                png[0][png[1]] = _png(fig)
    except Exception as err:  # noqa: BLE001 - the report must survive a bad plot
        return f"<p class=\"muted\" id=\"{pid}\" data-testid=\"{pid}\">{_e(label)}: plot unavailable ({_e(err)})</p>"
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure id=\"{pid}\" data-testid=\"{pid}\" class=\"plot\">{svg}{cap}</figure>"


def _ecdf(ax, values: np.ndarray, color: str, label: str, dashed: bool = False) -> None:
    x = np.sort(values)
    y = np.arange(1, x.size + 1) / x.size
    ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", color=color, lw=1.8, label=label,
            ls="--" if dashed else "-")


def _latency_fig(ctx: dict):
    data: _Data = ctx["data"]
    if data.answered.empty:
        return None
    fig = _figure(9.0, 3.4)
    axes = fig.subplots(1, 2)
    for ax, col, title in ((axes[0], "latency_s", "End-to-end latency"), (axes[1], "ttft_s", "Time to first token")):
        vals_all = []
        for arm in data.arms:
            v = data.arm(data.answered, arm)[col].to_numpy(dtype=float)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size == 0:
                continue
            vals_all.append(v)
            p50, p95 = np.quantile(v, 0.5), np.quantile(v, 0.95)
            _ecdf(ax, v, ctx["colors"].get(arm, "#111827"), f"{arm}  n={v.size}  p50 {p50:.2f}s  p95 {p95:.2f}s")
            ax.plot([p50], [0.5], "o", color=ctx["colors"].get(arm, "#111827"), ms=4)
            ax.plot([p95], [0.95], "s", color=ctx["colors"].get(arm, "#111827"), ms=4)
        if not vals_all:
            ax.text(0.5, 0.5, "no data (TTFT needs streamed requests)" if col == "ttft_s" else "no data",
                    ha="center", va="center", transform=ax.transAxes, color="#6b7280")
            ax.set_title(title)
            continue
        allv = np.concatenate(vals_all)
        if allv.max() / max(allv.min(), 1e-9) > 30:
            ax.set_xscale("log")
        for q in (0.5, 0.95):
            ax.axhline(q, color="#9ca3af", lw=0.7, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of requests ≤ x")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return fig


def _outcomes_fig(ctx: dict):
    data: _Data = ctx["data"]
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


def _pct_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _subset_table(data: _Data) -> pd.DataFrame:
    ab = data.ab
    if ab.empty:
        return pd.DataFrame()
    g = ab.groupby(["subset", "arm"], sort=True)
    out = g.size().rename("n").to_frame()
    out["failed"] = g["outcome"].agg(lambda s: int((s != "success").sum()))
    out["top failure"] = g["outcome"].agg(
        lambda s: (lambda vc: f"{vc.index[0]} {int(vc.iloc[0])}" if len(vc) else "")(s[s != "success"].value_counts())
    )
    out["failure rate"] = out["failed"] / out["n"]
    out = out.reset_index()
    rank = {a: i for i, a in enumerate(data.arms)}
    return out.sort_values(["subset", "arm"], key=lambda s: s.map(rank) if s.name == "arm" else s, kind="stable")


def _subset_fig(ctx: dict, table: pd.DataFrame):
    if table.empty:
        return None
    data: _Data = ctx["data"]
    subsets = table.groupby("subset")["n"].sum().sort_values(ascending=False).index.tolist()[:15]
    arms = [a for a in data.arms if (table["arm"] == a).any()]
    fig = _figure(9.0, 0.9 + 0.32 * len(subsets) * max(1, len(arms)) * 0.8)
    ax = fig.subplots()
    h = 0.8 / max(1, len(arms))
    y = np.arange(len(subsets))
    for i, arm in enumerate(arms):
        t = table[table["arm"] == arm].set_index("subset")
        rate = np.array([t["failure rate"].get(s, np.nan) for s in subsets], dtype=float)
        n = [t["n"].get(s, 0) for s in subsets]
        bars = ax.barh(y + i * h, np.nan_to_num(rate), height=h, color=ctx["colors"].get(arm), label=arm)
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


def _backend_rows(ctx: dict) -> list[tuple[str, dict[str, int]]]:
    data: _Data = ctx["data"]
    rows = []
    for label, frame in (("A/B", data.ab), ("observe", data.observe)):
        for arm in data.arms:
            f = data.arm(frame, arm)
            if len(f):
                rows.append((f"{label} · {arm}", f["backend"].value_counts().to_dict()))
    return rows


def _backend_fig(ctx: dict):
    rows = _backend_rows(ctx)
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


def _drift_fig(ctx: dict):
    data: _Data = ctx["data"]
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
        c = ctx["colors"].get(arm, "#111827")
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


def _cost_fig(ctx: dict):
    ev = ctx["ev"]
    arms = [a for a in ctx["data"].arms if _get(ev, "arms", a, "cost", "per_1k_success") is not None]
    vals = [float(_get(ev, "arms", a, "cost", "per_1k_success")) for a in arms]
    if not arms or not any(v > 0 for v in vals):
        return None
    fig = _figure(9.0, 0.9 + 0.4 * len(arms))
    ax = fig.subplots()
    bars = ax.barh(arms, vals, color=[ctx["colors"].get(a) for a in arms], height=0.55)
    for b, v in zip(bars, vals):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" ${v:,.4f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("USD per 1,000 successful requests")
    ax.grid(axis="y", visible=False)
    ax.set_xlim(0, max(vals) * 1.3)
    ax.set_title("Cost per 1k successful requests")
    return fig


# -- sections --------------------------------------------------------------------------------------
def _header(cfg: ExperimentConfig, ev: dict, dec: dict, run_id: str, data: _Data) -> str:
    arms = []
    for a in cfg.arms:
        arms.append(f"<li><b style=\"color:inherit\">{_e(a.name)}</b> <span class=\"muted\">({_e(a.role)})</span>: "
                    f"backend <code>{_e(a.backend)}</code>, {_e(a.target)}, model <code>{_e(a.model)}</code></li>")
    decided = dec.get("decided_at")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(decided)) if isinstance(decided, (int, float)) else "n/a"
    n_pairs = max((int(c.get("n_pairs", 0)) for c in (ev.get("comparisons") or {}).values()), default=0)
    wl = cfg.workload
    return (
        "<header id=\"header\" data-testid=\"header\">"
        f"<div class=\"eyebrow\">guided-ab experiment report</div><h1>{_e(cfg.name)}</h1>"
        f"<p class=\"muted\">{_e(cfg.description.strip())}</p>"
        f"<div class=\"meta\"><div><span>run</span><code>{_e(run_id)}</code></div>"
        f"<div><span>decided</span>{_e(when)}</div>"
        f"<div><span>pairs (A/B)</span>{n_pairs}</div>"
        f"<div><span>workload</span>{_e(wl.suite)}{(' / ' + _e(', '.join(wl.subsets))) if wl.subsets else ''}, "
        f"{wl.size} schemas × {wl.repeats}, {wl.observe_size} observe</div>"
        f"<div><span>records</span>{len(data.all)} ({len(data.ab)} measured A/B)</div></div>"
        f"<ul class=\"arms-list\">{''.join(arms)}</ul></header>"
    )


def _banner(dec: dict, ev: dict) -> str:
    verdict = str(dec.get("verdict", "?"))
    text = VERDICT_TEXT.get(verdict, verdict)
    reasons = "".join(f"<li>{_e(r)}</li>" for r in dec.get("reasons", [])) or "<li>no reasons recorded</li>"
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
        f"<div class=\"verdict\"><span class=\"vlabel\">decision</span><span class=\"vtext\">{_e(text)}</span></div>"
        f"<div class=\"serve\">serve <b>{_e(dec.get('serve'))}</b> · control {_e(ev.get('control'))} · "
        f"candidate{'s' if len(ev.get('candidates') or []) > 1 else ''} {_e(', '.join(ev.get('candidates') or []))}"
        f"{'' if ev.get('valid', True) else ' · <b>validity gates failed</b>'}</div>"
        f"<ul class=\"reasons\">{reasons}</ul>{extra}</section>"
    )


def _arm_cards(ctx: dict) -> str:
    ev = ctx["ev"]
    cards = []
    for arm in ctx["data"].arms:
        a = _get(ev, "arms", arm)
        if not isinstance(a, dict):
            continue
        be = _get(a, "backend", "counts") or {}
        total = sum(be.values()) or 1
        be_txt = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(be.items(), key=lambda kv: -kv[1])) or "n/a"
        fails = {k: v for k, v in (a.get("outcomes") or {}).items() if k != "success" and v}
        cards.append(
            f"<div class=\"card\" data-arm=\"{_e(arm)}\" style=\"border-top-color:{ctx['colors'].get(arm, '#111')}\">"
            f"<div class=\"card-h\"><b>{_e(arm)}</b> <span class=\"muted\">{_e(a.get('role'))} · "
            f"<code>{_e(a.get('configured_backend'))}</code> · n={_e(a.get('n'))}</span></div>"
            "<dl>"
            f"<dt>success</dt><dd>{_iv(_get(a, 'success', 'rate'), '{:.1%}')}</dd>"
            f"<dt>latency p50</dt><dd>{_iv(_get(a, 'latency', 'p50'))} s</dd>"
            f"<dt>latency p95</dt><dd>{_iv(_get(a, 'latency', 'p95'))} s</dd>"
            f"<dt>TTFT p50</dt><dd>{_iv(_get(a, 'ttft', 'p50'))} s</dd>"
            f"<dt>CV</dt><dd>{_iv(a.get('cv') or _get(a, 'latency', 'cv'))}</dd>"
            f"<dt>backend used</dt><dd>{_e(be_txt)}</dd>"
            f"<dt>failures</dt><dd>{_e(', '.join(f'{k} {v}' for k, v in sorted(fails.items())) or 'none')}</dd>"
            f"<dt>cost / 1k success</dt><dd>{_num(_get(a, 'cost', 'per_1k_success'), '${:,.4f}')}</dd>"
            "</dl></div>"
        )
    details = _table([{k: v for k, v in r.items()} for r in arm_rows(ev)], "arms-table")
    return (
        "<section id=\"arms\" data-testid=\"arms\"><h2>Arms at a glance</h2>"
        "<p class=\"muted\">A/B phase, warm-ups excluded; 95% intervals in brackets.</p>"
        f"<div class=\"cards\">{''.join(cards)}</div>"
        f"<details><summary>as a table</summary>{details}</details></section>"
    )


def _crit_fmt(name: str) -> Callable[[Any], str]:
    if name.startswith("success"):
        return lambda x: _num(x, "{:+.1%}")
    if name == "backend_share":
        return lambda x: _num(x, "{:.1%}")
    if name.startswith("cost"):
        return lambda x: _num(x, "${:,.4f}")
    return lambda x: _num(x, "{:.3f}")


def _reference(name: str) -> float | None:
    if name.startswith("success"):
        return 0.0
    if name.startswith(("latency", "variability")):
        return 1.0
    return None


def _interval_svg(c: dict) -> str:
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
    for m in ([margin] if margin is not None else list(band or ())):
        parts.append(f"<line x1=\"{x(m):.1f}\" x2=\"{x(m):.1f}\" y1=\"1\" y2=\"{H - 1}\" stroke=\"#dc2626\" "
                     "stroke-width=\"1.5\" stroke-dasharray=\"3 2\"><title>margin</title></line>")
    color = {"met": "#15803d", "not met": "#b91c1c", "unclear": "#b45309"}.get(str(c.get("verdict")), "#374151")
    if lo is not None and hi is not None:
        parts.append(f"<line x1=\"{x(lo):.1f}\" x2=\"{x(hi):.1f}\" y1=\"{H / 2}\" y2=\"{H / 2}\" stroke=\"{color}\" stroke-width=\"3\" "
                     "stroke-linecap=\"round\"/>")
    parts.append(f"<circle cx=\"{x(est):.1f}\" cy=\"{H / 2}\" r=\"4\" fill=\"white\" stroke=\"{color}\" stroke-width=\"2\"/></svg>")
    return "".join(parts)


def _criteria(ctx: dict) -> str:
    dec = ctx["dec"]
    rows = []
    for c in dec.get("criteria", []):
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
            extra.append(f"~{c['pairs_needed']} more pairs")
        row = {
            "criterion": f"<b>{_e(name)}</b> <span class=\"role\">{_e(c.get('role'))}</span>"
                         f"<div class=\"muted small\">{_e(c.get('metric', ''))}</div>",
            "candidate": _e(c.get("candidate")),
            "estimate": _e(f(c.get("estimate"))),
            "95% interval": _e(f"[{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "n/a"),
            "margin": _e(_num(c.get("margin"), "±{:.0%}") if name == "latency_equivalence" else f(c.get("margin"))),
            "": _interval_svg(c),
            "verdict": _badge(verdict, CRIT_CLASS.get(verdict, "info")),
            "notes": _e("; ".join(extra)),
        }
        if len(ctx["ev"].get("candidates") or []) < 2:
            del row["candidate"]
        rows.append(row)
    cols = frozenset(rows[0]) if rows else frozenset()
    return (
        "<section id=\"criteria\" data-testid=\"criteria\"><h2>Decision criteria (pre-registered in the config)</h2>"
        "<p class=\"muted\">Guardrails must all be <i>met</i> (the whole interval on the good side of the red dashed "
        "margin) and one primary criterion must be met for a switch. Grey line: no difference. Dot: estimate, bar: "
        "95% interval. Informational rows never change the verdict.</p>"
        + _table(rows, "criteria-table", "criteria", raw=cols) + "</section>"
    )


def _latency(ctx: dict) -> str:
    ev = ctx["ev"]
    rows = []
    for arm in ctx["data"].arms:
        a = _get(ev, "arms", arm)
        if not isinstance(a, dict):
            continue
        for metric, label in (("latency", "end-to-end s"), ("ttft", "TTFT s"), ("tpot", "per output token s")):
            m = a.get(metric) or {}
            rows.append({
                "arm": _e(arm), "metric": _e(label), "n": _e(m.get("n")),
                "mean": _iv(m.get("mean"), "{:.3f}"), "p50": _iv(m.get("p50"), "{:.3f}"),
                "p95": _iv(m.get("p95"), "{:.3f}"),
                "p99": _iv(m.get("p99"), "{:.3f}") + (" <span class=\"muted\">(descriptive)</span>" if _get(m, "p99", "descriptive") else ""),
            })
        fvr = a.get("first_vs_repeated") or {}
        if _get(fvr, "repeated", "n"):
            rows.append({
                "arm": _e(arm), "metric": "first request per schema vs repeated (p50 s)", "n": _e(_get(fvr, "first", "n")),
                "mean": "", "p50": f"{_iv(_get(fvr, 'first', 'p50'), '{:.3f}')} vs {_iv(_get(fvr, 'repeated', 'p50'), '{:.3f}')}",
                "p95": "", "p99": "",
            })
    comp_rows = []
    for cand, c in (ev.get("comparisons") or {}).items():
        lat = c.get("latency") or {}
        comp_rows.append({
            "candidate / control": _e(f"{cand} / {c.get('control')}"), "pairs": _e(lat.get("n_pairs")),
            "mean ratio": _iv(lat.get("ratio_mean"), "{:.3f}"), "p50 ratio": _iv(lat.get("ratio_p50"), "{:.3f}"),
            "p95 ratio": _iv(lat.get("ratio_p95"), "{:.3f}"),
            "Wilcoxon p": _e(_num(_get(lat, "wilcoxon", "pvalue"), "{:.3g}")),
        })
    raw = frozenset({"arm", "metric", "n", "mean", "p50", "p95", "p99"})
    return (
        _plot("plot-latency-cdf", "Latency CDFs per arm (end-to-end and TTFT)", lambda: _latency_fig(ctx),
              "Share of answered requests finished (left) or first token seen (right) within x seconds. "
              "A curve further left is faster; a gap at the top is a tail. Dots: p50, squares: p95.",
              png=(ctx["pngs"], "latency_cdf.png"))
        + "<h3>Per arm</h3>" + _table(rows, "latency-table", raw=raw)
        + "<h3>Paired ratios (same schema on both arms)</h3>"
        + _table(comp_rows, "ratio-table", raw=frozenset(comp_rows[0]) if comp_rows else frozenset())
    )


def _failures(ctx: dict) -> str:
    data: _Data = ctx["data"]
    sub = _subset_table(data)
    sub_rows = [
        {"subset": r["subset"], "arm": r["arm"], "requests": int(r["n"]), "failed": int(r["failed"]),
         "failure rate": f"{r['failure rate']:.1%}", "most common failure": r["top failure"] or "-"}
        for _, r in sub.iterrows()
    ]
    errs = data.ab[(data.ab["outcome"] != "success") & data.ab["error"].notna()] if "error" in data.ab else data.ab.iloc[:0]
    err_rows = []
    if len(errs):
        top = errs.assign(msg=errs["error"].astype(str).str.slice(0, 160)).groupby(["arm", "outcome", "msg"]).size()
        for (arm, outcome, msg), k in top.sort_values(ascending=False).head(12).items():
            err_rows.append({"arm": arm, "outcome": outcome, "count": int(k), "message": msg})
    return (
        _plot("plot-outcomes", "Outcome classes per arm", lambda: _outcomes_fig(ctx),
              "Every measured A/B request falls in exactly one class; success means JSON that validates against the schema.",
              png=(ctx["pngs"], "outcomes.png"))
        + _plot("plot-subset-failures", "Failure rate per schema subset", lambda: _subset_fig(ctx, sub),
                "Where failures come from: failure rate of each arm within each schema subset (largest subsets first).")
        + "<details open><summary>per subset and arm</summary>" + _table(sub_rows, "subset-table") + "</details>"
        + ("<details><summary>most frequent error messages</summary>" + _table(err_rows, "error-table") + "</details>"
           if err_rows else "")
    )


def _backends(ctx: dict) -> str:
    ev = ctx["ev"]
    rows = []
    for arm in ctx["data"].arms:
        b = _get(ev, "arms", arm, "backend") or {}
        if b:
            rows.append({"arm": _e(arm), "phase": "A/B", "configured": _e(_get(ev, "arms", arm, "configured_backend")),
                         "resolved": _e(", ".join(f"{k} {v}" for k, v in sorted((b.get("counts") or {}).items())) or "n/a"),
                         "expected": _e(b.get("expected")), "expected share [95% CI]": _iv(b.get("share"), "{:.1%}")})
    for arm, o in (_get(ev, "observe", "arms") or {}).items():
        rows.append({"arm": _e(arm), "phase": "observe", "configured": _e(_get(ev, "arms", arm, "configured_backend")),
                     "resolved": _e(", ".join(f"{k} {v}" for k, v in sorted((o.get("backend_counts") or {}).items())) or "n/a"),
                     "expected": _e(_get(ev, "arms", arm, "backend", "expected")),
                     "expected share [95% CI]": _iv(o.get("backend_share"), "{:.1%}")})
    per_schema, phases = [], "observe and A/B"
    for arm, sb in (_get(ev, "schema_backends") or {}).items():  # every schema a candidate was sent
        per_schema += [{"arm": arm, "schema": sid, "backend": b}
                       for b, ids in (sb.get("by_backend") or {}).items() for sid in ids]
    mixed = {a: sb.get("mixed") for a, sb in (_get(ev, "schema_backends") or {}).items() if sb.get("mixed")}
    if not per_schema:  # evaluations written before schema_backends existed
        phases = "observe phase"
        for arm, schemas in (_get(ev, "observe", "schema_backends") or {}).items():
            if isinstance(schemas, dict):
                per_schema += [{"arm": arm, "schema": s, "backend": b} for s, b in sorted(schemas.items())]
        mixed = {a: m for a, m in (_get(ev, "observe", "mixed_schemas") or {}).items() if m}
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
        + _plot("plot-backend", "Resolved backend share per arm and phase", lambda: _backend_fig(ctx))
        + _table(rows, "backend-table", raw=frozenset(rows[0]) if rows else frozenset()) + schema_html
    )


def _drift_rows(ctx: dict) -> list[dict]:
    from scipy import stats as sps

    data: _Data = ctx["data"]
    rows = []
    for arm in data.arms:
        f = data.arm(data.answered, arm).sort_values("sent_at")
        lat = f["latency_s"].to_numpy(dtype=float)
        lat = lat[np.isfinite(lat)]
        if lat.size < 6:
            continue
        k = lat.size // 3
        first, last = float(np.median(lat[:k])), float(np.median(lat[-k:]))
        rho = sps.spearmanr(np.arange(lat.size), lat)
        rows.append({"arm": arm, "answered": int(lat.size), "p50 first third s": f"{first:.3f}",
                     "p50 last third s": f"{last:.3f}", "change": f"{last / first - 1:+.1%}" if first > 0 else "n/a",
                     "Spearman rho (latency ~ order)": f"{rho.statistic:+.2f} (p {rho.pvalue:.2g})"})
    return rows


def _drift(ctx: dict) -> str:
    try:
        rows = _drift_rows(ctx)
    except Exception:  # noqa: BLE001
        rows = []
    return (
        "<p class=\"muted\">Pairs are interleaved (ABBA), so a slow-down of the machine or server during the run "
        "should hit both arms alike. Diverging trends, or a trend within one arm, mean the comparison may not "
        "hold at another time.</p>"
        + _plot("plot-drift", "Latency over time per arm", lambda: _drift_fig(ctx),
                "Dots: successful requests; crosses: answered but failed (truncated, invalid JSON, schema violation); "
                "ticks on the time axis: requests without an answer (rejected, timeout, server or connection error).")
        + _table(rows, "drift-table")
    )


def _cost(ctx: dict) -> str:
    ev = ctx["ev"]
    held = {e.get("arm"): e for e in ctx["teardown"].get("arms", [])}
    rows = []
    for arm in ctx["data"].arms:
        c = _get(ev, "arms", arm, "cost")
        if c is None:
            continue
        h = held.get(arm, {})
        rows.append({
            "arm": arm, "held": f"{h['held_s'] / 60:.1f} min" if isinstance(h.get("held_s"), (int, float)) else "n/a",
            "cost USD": _num(c.get("usd"), "${:,.4f}"), "successful requests": _num(c.get("successful_requests"), "{}"),
            "USD per 1k successful": _num(c.get("per_1k_success"), "${:,.4f}"),
        })
    ratios = [f"{cand}: cost ratio per 1k successful vs control {_num(c.get('cost_ratio_per_1k_success'), '{:.3f}')}"
              for cand, c in (ev.get("comparisons") or {}).items()]
    note = ("<p class=\"muted\">Cost counts the time each endpoint was held (start to teardown) at its configured "
            "hourly price; all zero means the arms are priced at 0 (local servers).</p>")
    return (note + _table(rows, "cost", "cost") + _plot("plot-cost", "Cost per 1k successful requests", lambda: _cost_fig(ctx))
            + "".join(f"<p class=\"muted\">{_e(r)}</p>" for r in ratios))


def _gates(ev: dict) -> str:
    rows = [{"gate": _e(g.get("name")),
             "result": _badge("skipped" if g.get("skipped") else ("passed" if g.get("passed") else "FAILED"),
                              "info" if g.get("skipped") else ("ok" if g.get("passed") else "bad")),
             "detail": _e(g.get("detail", ""))} for g in ev.get("gates", [])]
    return ("<p class=\"muted\">Checked before any statistic: a failed gate makes the experiment invalid, whatever "
            "the numbers say.</p>" + _table(rows, "gates", "gates", raw=frozenset({"gate", "result", "detail"})))


def _settings(ev: dict, dec: dict) -> str:
    rows = [{"setting": k, "value": v} for k, v in (ev.get("settings") or {}).items()]
    rows += [{"setting": f"threshold {k}", "value": v} for k, v in (dec.get("thresholds") or {}).items()]
    return f"<details id=\"settings\" data-testid=\"settings\"><summary>{len(rows)} settings</summary>{_table(rows)}</details>"



CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--ok:#15803d;--bad:#b91c1c;--warn:#b45309;--info:#1d4ed8}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:26px;margin:2px 0 4px}h2{font-size:18px;margin:0 0 10px}h3{font-size:14px;margin:16px 0 6px;color:#374151}
section,header{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:0 0 16px}
.eyebrow{text-transform:uppercase;letter-spacing:.08em;font-size:11px;color:var(--muted)}
.muted{color:var(--muted)}.small{font-size:12px}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f5f9;padding:1px 4px;border-radius:4px}
.meta{display:flex;flex-wrap:wrap;gap:8px 24px;margin:10px 0}.meta div{display:flex;flex-direction:column}.meta span{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.arms-list{margin:6px 0 0;padding-left:18px}
.banner{border-width:0;border-left:8px solid;padding:18px 22px}
.banner .verdict{display:flex;align-items:baseline;gap:12px;flex-wrap:wrap}
.banner .vlabel{text-transform:uppercase;font-size:11px;letter-spacing:.1em;opacity:.8}
.banner .vtext{font-size:24px;font-weight:700}
.banner .serve{margin:4px 0 8px}.banner .reasons{margin:6px 0 0;padding-left:20px}.banner .need{margin:8px 0 0}
.v-switch{background:#ecfdf5;border-color:var(--ok);color:#064e3b}
.v-keep{background:#eff6ff;border-color:var(--info);color:#1e3a8a}
.v-inconclusive{background:#fffbeb;border-color:#d97706;color:#78350f}
.v-invalid{background:#fef2f2;border-color:var(--bad);color:#7f1d1d}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px;margin:8px 0}
.card{border:1px solid var(--line);border-top:5px solid;border-radius:8px;padding:10px 14px}
.card-h{margin-bottom:6px}.card dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
.card dt{color:var(--muted)}.card dd{margin:0;font-variant-numeric:tabular-nums}
.ci{color:var(--muted);font-size:12px}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:6px 0;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:#374151;background:#f9fafb;white-space:nowrap}
table.criteria td{vertical-align:middle;white-space:nowrap}table.criteria td:first-child{white-space:normal;min-width:220px}
table.criteria td:last-child{white-space:normal;font-size:12px;color:var(--muted)}
.role{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);border:1px solid var(--line);border-radius:4px;padding:0 4px;margin-left:4px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
.badge.ok{background:#dcfce7;color:var(--ok)}.badge.bad{background:#fee2e2;color:var(--bad)}
.badge.warn{background:#fef3c7;color:var(--warn)}.badge.info{background:#e0e7ff;color:var(--info)}
figure.plot{margin:8px 0 14px}figure.plot svg{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:2px}
details{margin:8px 0}summary{cursor:pointer;color:#374151;font-weight:600}
.warn-text{color:var(--warn)}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:20px}
a{color:var(--info)}
@media print{body{background:#fff}section,header{break-inside:avoid}}
"""
