"""Human-facing outputs of a run: report.md, the CLI summary table, the list of runs.

The HTML report (plots) lives in guided_ab/html_report.py; this module writes both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from guided_ab.config import ExperimentConfig
from guided_ab.store import RunStore, atomic_write_text, list_runs

VERDICT_TEXT = {
    "switch": "SWITCH to the candidate",
    "keep": "KEEP the control",
    "inconclusive": "INCONCLUSIVE: run more requests",
    "invalid": "INVALID experiment: fix and re-run",
}


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _iv(d: dict | None, fmt: str = "{:.2f}") -> str:
    if not d or d.get("estimate") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None:
        return _f(d["estimate"], fmt)
    return f"{fmt.format(d['estimate'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def arm_rows(evaluation: dict) -> list[dict]:
    """One row per arm: the seed's comparison table (success, latency, backend, variability, cost)."""
    rows = []
    for name, a in evaluation.get("arms", {}).items():
        lat = a.get("latency", {})
        backend = a.get("backend", {})
        counts = backend.get("counts", {})
        rows.append({
            "arm": name,
            "role": a.get("role"),
            "backend (configured)": a.get("configured_backend"),
            "n": a.get("n"),
            "success rate [95% CI]": _iv(a.get("success", {}).get("rate"), "{:.1%}"),
            "latency p50 s": _iv(lat.get("p50")),
            "latency p95 s": _iv(lat.get("p95")),
            "TTFT p50 s": _iv(a.get("ttft", {}).get("p50")),
            "CV": _iv(a.get("cv") or lat.get("cv")),
            "backend used": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "n/a",
            "failures": ", ".join(f"{k} {v}" for k, v in sorted(a.get("outcomes", {}).items()) if k != "success" and v) or "none",
            "cost USD": _f(a.get("cost", {}).get("usd"), "{:.4f}"),
        })
    return rows


def criteria_rows(decision: dict) -> list[dict]:
    return [
        {
            "criterion": c.get("name"), "candidate": c.get("candidate"),
            "estimate": _f(c.get("estimate"), "{:.3f}"),
            "95% CI": f"[{_f(c.get('ci_low'), '{:.3f}')}, {_f(c.get('ci_high'), '{:.3f}')}]",
            "margin": _f(c.get("margin"), "{:.3f}"), "verdict": c.get("verdict"),
        }
        for c in decision.get("criteria", [])
    ]


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def observe_section(evaluation: dict) -> str:
    obs = evaluation.get("observe", {})
    parts = []
    for arm, a in obs.get("arms", {}).items():
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(a.get("backend_counts", {}).items()))
        parts.append(f"- **{arm}** (observe phase): {a.get('n')} requests; backends resolved: {counts or 'n/a'}")
    for arm, sb in evaluation.get("schema_backends", {}).items():
        if sb.get("schemas"):
            parts.append(f"\nBackend `{arm}` resolved, per schema it was sent (observe and A/B, "
                         "from the server's own resolution):\n")
            parts.append(_md_table([{"backend": b, "schemas": len(ids), "which": ", ".join(ids)}
                                    for b, ids in sb.get("by_backend", {}).items()]))
            if sb.get("mixed"):
                parts.append(f"Resolved to more than one backend: {', '.join(sb['mixed'])}\n")
    per_schema = obs.get("schema_backends", {})
    if per_schema and not evaluation.get("schema_backends"):
        parts.append("\nBackend resolved per schema (observe phase, from the server's own resolution):\n")
        rows = []
        for arm, schemas in per_schema.items():
            if isinstance(schemas, dict):
                rows += [{"arm": arm, "schema": s, "backend": b} for s, b in sorted(schemas.items())]
        parts.append(_md_table(rows))
    return "\n".join(parts) + "\n" if parts else "_no observe phase_\n"


def render_markdown(cfg: ExperimentConfig, evaluation: dict, decision: dict, run_id: str) -> str:
    verdict = decision.get("verdict", "?")
    lines = [
        f"# {cfg.name}: {VERDICT_TEXT.get(verdict, verdict)}",
        "",
        f"Run `{run_id}` — control **{evaluation.get('control')}**, candidates "
        f"{', '.join('**' + c + '**' for c in evaluation.get('candidates', []))}; serve **{decision.get('serve')}**.",
        "",
        "## Why",
        *[f"- {r}" for r in decision.get("reasons", [])],
        "",
        "## Criteria (pre-registered in the config)",
        _md_table(criteria_rows(decision)),
    ]
    if decision.get("overridden"):
        lines += [f"_Thresholds changed after the run: {json.dumps(decision['overridden'])}_", ""]
    if verdict == "inconclusive":
        lines += [f"About **{decision.get('pairs_needed')}** more pairs would settle it "
                  f"(minimum detectable effect now: {json.dumps(decision.get('mde'))}).", ""]
    lines += [
        "## Arms (A/B phase, warm-ups excluded)",
        _md_table(arm_rows(evaluation)),
        "## What the candidates resolved to",
        observe_section(evaluation),
        "## Validity gates",
        _md_table([{"gate": g["name"], "passed": "yes" if g["passed"] else "**NO**", "detail": g.get("detail", "")}
                   for g in evaluation.get("gates", [])]),
    ]
    return "\n".join(lines)


def write_reports(store: RunStore, cfg: ExperimentConfig, evaluation: dict, decision: dict) -> None:
    md = render_markdown(cfg, evaluation, decision, store.run_id)
    atomic_write_text(store.path("report.md"), md)  # first: a failing HTML report never costs this one
    try:
        from guided_ab.reports.html import write_html_report
    except ImportError:  # the HTML report is optional
        return
    write_html_report(store, cfg, evaluation, decision)
    atomic_write_text(store.path("report.md"), md + plots_markdown(store.dir))


PLOT_IMAGES = {"latency_cdf.png": "Latency CDFs per arm (end-to-end and TTFT)", "outcomes.png": "Outcome classes per arm"}


def plots_markdown(run_dir: Path) -> str:
    """The key plots (PNGs beside report.html) as a markdown section with relative links."""
    images = [f"![{alt}]({name})" for name, alt in PLOT_IMAGES.items() if (run_dir / name).is_file()]
    if not images and not (run_dir / "report.html").is_file():
        return ""
    return "\n## Plots\n\nEvery plot, with the criteria drawn against their margins: [report.html](report.html)\n\n" + \
        "\n\n".join(images) + "\n"


def artifact_markdown(run_dir: Path) -> str:
    """report.md for places that cannot follow relative links (the Prefect UI): the key plots
    inlined as data URIs and report.html linked by its absolute file URI."""
    import base64

    md = (run_dir / "report.md").read_text()
    for name in PLOT_IMAGES:
        p = run_dir / name
        if p.is_file() and f"]({name})" in md:
            md = md.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode('ascii')})")
    html = run_dir / "report.html"
    if html.is_file():
        md = md.replace("](report.html)", f"]({html.resolve().as_uri()})")
    return md


def summary_table(run_dir: Path) -> Table:
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    decision = json.loads((run_dir / "decision.json").read_text())
    rows = arm_rows(evaluation)
    table = Table(title=f"{run_dir.name}: {VERDICT_TEXT.get(decision['verdict'], decision['verdict'])}")
    cols = ["arm", "backend (configured)", "n", "success rate [95% CI]", "latency p50 s", "latency p95 s", "backend used", "failures"]
    for c in cols:
        # numbers and their intervals never break across lines; the failure list may
        table.add_column(c, no_wrap=c != "failures")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    return table


VERDICT_STYLE = {"switch": "bold green", "keep": "bold blue", "inconclusive": "bold yellow", "invalid": "bold red"}


def runs_table(root: str | Path) -> Table:
    """Past runs, newest first (the run id holds the start time): decision, what to serve, pairs,
    per-arm success rate and p50 latency."""
    runs = list_runs(root)
    table = Table(title=f"runs in {Path(root).resolve()}",
                  caption=None if runs else "no runs yet: `guided-ab run configs/local.yaml` starts one")
    table.add_column("run id", overflow="fold")
    table.add_column("decision", no_wrap=True)
    table.add_column("serve", overflow="fold")
    table.add_column("pairs", justify="right")
    table.add_column("per arm: success · p50")
    for d in runs:
        try:
            decision = json.loads((d / "decision.json").read_text())
            evaluation = json.loads((d / "evaluation.json").read_text())
            arms = "\n".join(
                f"{n} {_f((a.get('success', {}).get('rate') or {}).get('estimate'), '{:.0%}')} · "
                f"{_f((a.get('latency', {}).get('p50') or {}).get('estimate'), '{:.2f}s')}"
                for n, a in evaluation.get("arms", {}).items()
            )
            pairs = max((int(c.get("n_pairs", 0)) for c in evaluation.get("comparisons", {}).values()), default=0)
            verdict = decision.get("verdict", "?")
            table.add_row(d.name, f"[{VERDICT_STYLE.get(verdict, 'bold')}]{verdict}[/]", str(decision.get("serve")),
                          str(pairs), arms)
        except (OSError, ValueError):
            table.add_row(d.name, "[dim](not decided)[/]", "", "", "")
    return table


def records_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Counts of outcome classes per phase and arm (for artifacts and quick looks)."""
    if df.empty:
        return pd.DataFrame()
    return df.pivot_table(index=["phase", "arm"], columns="outcome", values="request_id", aggfunc="count", fill_value=0)
