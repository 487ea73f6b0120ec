"""The markdown report of a run: report.md (decision, reasons, criteria, arms, what the candidates
resolved to, validity gates, then links to the key plots), and the same text for the Prefect UI,
which cannot follow relative links (`artifact_markdown`).

Reads the report model and the plot list (plots.KEY_PLOTS: the PNG names and their alt text);
files.py writes report.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guided_ab.reports.format import counts_text
from guided_ab.reports.model import (
    OBSERVE_SERVER_METRICS,
    OBSERVE_SERVER_METRICS_NOTE,
    OFFERED_LOAD_NOTE,
    REPLICAS_NOTE,
    SERVER_METRICS_NOTE,
    ReportModel,
    explain_rows,
    observe_server_notes,
    offered_load,
    offered_load_line,
    offered_load_rows,
    replica_rows,
    server_metrics_notes,
    server_time_rows,
)
from guided_ab.reports.plots import KEY_PLOTS

if TYPE_CHECKING:
    from guided_ab.store import RunStore

# what markdown (and the HTML a markdown renderer lets through) would read as markup in a text
# that came from a server or a run file: backslash-escaped, so it shows as the text it is
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>~$|])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_text(x: Any) -> str:
    """Any value as markdown text that renders as itself (one line)."""
    text = " ".join(str(x).splitlines())
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def _md_table(rows: list[dict[str, Any]], raw: tuple[str, ...] = ()) -> str:
    """A markdown table; every cell escaped (md_text) but those of the `raw` columns (our own markdown)."""
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) if c in raw else md_text(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def observe_section(evaluation: Mapping[str, Any]) -> str:
    """What the candidates resolved to: the observe phase's backends, and the backend per schema."""
    obs = evaluation.get("observe", {})
    parts = []
    for arm, a in obs.get("arms", {}).items():
        counts = counts_text(a.get("backend_counts", {}), sep=": ")
        parts.append(f"- **{md_text(arm)}** (observe phase): {a.get('n')} requests; backends resolved: {md_text(counts or 'n/a')}")
    for arm, sb in evaluation.get("schema_backends", {}).items():
        if sb.get("schemas"):
            parts.append(f"\nBackend {md_text(arm)} resolved, per schema it was sent (observe and A/B, "
                         "from the server's own resolution):\n")
            parts.append(_md_table([{"backend": b, "schemas": len(ids), "which": ", ".join(ids)}
                                    for b, ids in sb.get("by_backend", {}).items()]))
            if sb.get("mixed"):
                parts.append(f"Resolved to more than one backend: {md_text(', '.join(sb['mixed']))}\n")
    per_schema = obs.get("schema_backends", {})
    if per_schema and not evaluation.get("schema_backends"):
        parts.append("\nBackend resolved per schema (observe phase, from the server's own resolution):\n")
        rows = []
        for arm, schemas in per_schema.items():
            if isinstance(schemas, dict):
                rows += [{"arm": arm, "schema": s, "backend": b} for s, b in sorted(schemas.items())]
        parts.append(_md_table(rows))
    return "\n".join(parts) + "\n" if parts else "_no observe phase_\n"


def workload_problems_section(evaluation: Mapping[str, Any]) -> str:
    """Requests the server refused for the workload's own sake (context overflow, bad parameters):
    apart from the backends' failures, with what including them would change, and the pre-flight
    count of prompts that could not fit."""
    wp = evaluation.get("workload_problems") or {}
    parts = []
    if wp.get("pairs"):
        classes = ", ".join(f"{md_text(k)} {v}" for k, v in sorted(wp.get("by_outcome", {}).items()))
        parts.append(f"**{wp['pairs']} of {wp['of_pairs']} A/B pairs ({wp['share']:.1%})** were refused for a reason "
                     f"unrelated to structured output ({classes}; backend attribution `none`) and are excluded from "
                     "the comparison: no backend is blamed for them.\n")
        rows = [{"arm": arm, "success rate (excluded)": _pct(wp["success_rate_excluded"].get(arm)),
                 "success rate (if counted as failures)": _pct(wp["success_rate_if_included"].get(arm))}
                for arm in wp.get("success_rate_excluded", {})]
        parts.append("Sensitivity: including them would change each arm's success rate as follows.\n")
        parts.append(_md_table(rows))
        parts.append(f"Requests: {md_text(', '.join(wp.get('schemas', [])[:20]))}"
                     + (" ..." if len(wp.get("schemas", [])) > 20 else "") + "\n")
    else:
        parts.append("None: every A/B request reached the backends.\n")
    pre = evaluation.get("preflight") or {}
    if pre.get("counted"):
        parts.append(f"Pre-flight: {pre['counted']} prompts counted with the served model's tokenizer; "
                     f"{len(pre.get('too_long', []))} could not fit max_model_len {pre.get('max_model_len')} - max_tokens"
                     + (f"; dropped and replaced: {md_text(', '.join(pre['dropped']))}" if pre.get("dropped") else
                        f" (policy {md_text(pre.get('policy', 'keep'))})") + ".\n")
    return "\n".join(parts)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.1%}"


def replicas_section(m: ReportModel) -> list[str]:
    """Per-replica latency, only when an arm was served by more than one container (nothing otherwise)."""
    if not m.replicas:
        return []
    return ["## Per-replica latency (containers of one arm, A/B phase, warm-ups excluded)",
            md_text(REPLICAS_NOTE) + "\n", _md_table(replica_rows(m.replicas))]


def server_metrics_section(evaluation: Mapping[str, Any]) -> str:
    """Per arm, the server's mean queue / prefill / decode time beside its and the client's TTFT and
    latency (guided_ab/load/server_metrics.py); a line per arm without metrics, saying why."""
    rows = server_time_rows(evaluation)
    parts = [md_text(SERVER_METRICS_NOTE) + "\n", _md_table(rows)] if rows else []
    parts += [md_text(n) + "\n" for n in server_metrics_notes(evaluation)]
    observe = server_time_rows(evaluation, OBSERVE_SERVER_METRICS)
    if observe:  # the candidates alone, before the A/B: a second, smaller table
        parts += ["### Observe phase (the candidates alone, before the A/B)\n",
                  md_text(OBSERVE_SERVER_METRICS_NOTE) + "\n", _md_table(observe)]
    parts += [md_text(n) + "\n" for n in observe_server_notes(evaluation)]
    return "\n".join(parts)


def offered_load_section(evaluation: Mapping[str, Any]) -> list[str]:
    """"Load as offered" of the A/B phase: the profile, offered and achieved rate and send lag
    (guided_ab/analysis/offered_load.py); nothing for an evaluation written before it existed."""
    block = offered_load(evaluation, "ab")
    if block is None:
        return []
    parts = ["## Load as offered (A/B phase)", md_text(offered_load_line(block)) + "\n"]
    rows = offered_load_rows(block)
    if rows:
        parts += [md_text(OFFERED_LOAD_NOTE) + "\n", _md_table(rows)]
    return parts


def render_markdown(m: ReportModel) -> str:
    """report.md without its plots section (`plots_markdown` adds it once the PNGs exist)."""
    evaluation, decision, s = m.evaluation, m.decision, m.summary
    lines = [
        f"# {m.cfg.name}: {s.verdict_text}",
        "",
        f"Run `{m.run_id}` — control **{s.control}**, candidates "
        f"{', '.join('**' + c + '**' for c in s.candidates)}; serve **{s.serve}**.",
        "",
        *[f"_{md_text(h)}_" for h in s.hypotheses],
        "",
        "## Why",
        *[f"- {md_text(r)}" for r in s.reasons],
        "",
        "## Criteria (pre-registered in the config)",
        _md_table(s.criteria_rows),
    ]
    if decision.get("overridden"):
        lines += [f"_Thresholds changed after the run: {json.dumps(decision['overridden'])}_", ""]
    if s.verdict == "inconclusive":
        unit = decision.get("needed_unit") or "pairs"
        lines += [f"About **{decision.get('pairs_needed')}** more {unit} would settle it "
                  f"(minimum detectable effect now: {md_text(json.dumps(decision.get('mde')))}).", ""]
    lines += [
        "## Arms (A/B phase, warm-ups excluded)",
        _md_table(s.arm_rows),
        *offered_load_section(evaluation),
        "## Latency, explained (slower computation or longer answers)",
        "Timeouts and connection errors count as latencies censored at the workload's timeout: "
        "quantiles past the censored share are lower bounds and means are restricted means.\n",
        _md_table(explain_rows(evaluation)),
        *replicas_section(m),
        "## Where the servers' time went (their own /metrics)",
        server_metrics_section(evaluation),
        "## Workload problems (refused for the workload's own sake, not the backends')",
        workload_problems_section(evaluation),
        "## What the candidates resolved to",
        observe_section(evaluation),
        "## Validity gates",
        _md_table([{"gate": g["name"], "passed": "yes" if g["passed"] else "**NO**", "detail": g.get("detail", "")}
                   for g in evaluation.get("gates", [])], raw=("passed",)),
    ]
    return "\n".join(lines)


def plots_markdown(run_dir: Path | Callable[[str], bool]) -> str:
    """The key plots (PNGs beside report.html) as a markdown section with relative links. `run_dir`:
    the run directory, or whether the run has a file (RunStore.has: a run in an object store)."""
    has = run_dir if callable(run_dir) else (lambda name: (run_dir / name).is_file())
    images = [f"![{alt}]({name})" for name, alt in KEY_PLOTS.items() if has(name)]
    if not images and not has("report.html"):
        return ""
    return "\n## Plots\n\nEvery plot, with the criteria drawn against their margins: [report.html](report.html)\n\n" + \
        "\n\n".join(images) + "\n"


def artifact_markdown(run_dir: Path | RunStore) -> str:
    """report.md for places that cannot follow relative links (the Prefect UI): the key plots
    inlined as data URIs and report.html linked by its absolute file URI."""
    import base64

    if not isinstance(run_dir, Path):  # a RunStore of a run in an object store: read through it, link its URL
        md = run_dir.read_text("report.md")
        for name in KEY_PLOTS:
            if f"]({name})" in md and run_dir.has(name):
                md = md.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(run_dir.read_bytes(name)).decode('ascii')})")
        return md.replace("](report.html)", f"]({run_dir.uri('report.html')})") if run_dir.has("report.html") else md
    md = (run_dir / "report.md").read_text()
    for name in KEY_PLOTS:
        p = run_dir / name
        if p.is_file() and f"]({name})" in md:
            md = md.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode('ascii')})")
    html = run_dir / "report.html"
    if html.is_file():
        md = md.replace("](report.html)", f"]({html.resolve().as_uri()})")
    return md
