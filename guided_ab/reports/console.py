"""The CLI's tables (rich): a run's summary after `guided-ab run`, and the list of past runs
(`guided-ab runs`). Both read only evaluation.json and decision.json, through the report model's
Summary: listing many runs never loads their records.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from guided_ab.reports.format import num
from guided_ab.reports.model import Summary
from guided_ab.storage import is_object_store
from guided_ab.store import RunStore, list_runs

VERDICT_STYLE = {"switch": "bold green", "keep": "bold blue", "inconclusive": "bold yellow", "invalid": "bold red"}
SUMMARY_COLUMNS = ("arm", "backend (configured)", "n", "success rate [95% CI]", "latency p50 s", "latency p95 s",
                   "backend used", "failures")


def summary_table(run_dir: Path | RunStore) -> Table:
    """Per arm: configured backend, n, success rate, p50/p95 latency, backend used, failures.
    `run_dir`: a run directory, or a RunStore (a run in an object store has no directory)."""
    if isinstance(run_dir, RunStore):
        name = run_dir.run_id
        s = Summary.from_results(run_dir.read_json("evaluation.json"), run_dir.read_json("decision.json"), name)
        problems = _workload_problems(run_dir.read_json("evaluation.json", default={}))
    else:
        name, s, problems = run_dir.name, Summary.load(run_dir), workload_problems_lines(run_dir)
    # every cell is Text: backends, failure classes and verdicts come from server answers and
    # run files, and a `[/bold]` in one must print as itself, never as rich markup
    notes = [*s.hypotheses, *problems]
    table = Table(title=Text(f"{name}: {s.verdict_text}"),
                  caption=Text("\n".join(notes)) if notes else None)
    for c in SUMMARY_COLUMNS:
        # numbers and their intervals never break across lines; the failure list may
        table.add_column(c, no_wrap=c != "failures")
    for r in s.arm_rows:
        table.add_row(*(Text(str(r[c])) for c in SUMMARY_COLUMNS))
    return table


def workload_problems_lines(run_dir: Path) -> list[str]:
    """The workload problems of a run (evaluation.json), apart from the backends' failures."""
    try:
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
    except (OSError, ValueError):
        return []
    return _workload_problems(evaluation)


def _workload_problems(evaluation: object) -> list[str]:
    try:
        wp = evaluation.get("workload_problems") or {}  # type: ignore[attr-defined]
    except AttributeError:
        return []
    if not wp.get("pairs"):
        return []
    classes = ", ".join(f"{k} {v}" for k, v in sorted(wp.get("by_outcome", {}).items()))
    return [f"workload problems (not the backends'): {wp['pairs']} of {wp['of_pairs']} A/B pairs ({wp['share']:.1%}: "
            f"{classes}) excluded from the comparison"]


def runs_table(root: str | Path) -> Table:
    """Past runs, newest first (the run id holds the start time): decision, what to serve, pairs,
    per-arm success rate and p50 latency."""
    if is_object_store(root):
        return _object_runs_table(str(root))
    runs = list_runs(root)
    table = Table(title=Text(f"runs in {Path(root).resolve()}"),
                  caption=None if runs else "no runs yet: `guided-ab run configs/local.yaml` starts one")
    table.add_column("run id", overflow="fold")
    table.add_column("decision", no_wrap=True)
    table.add_column("serve", overflow="fold")
    table.add_column("pairs", justify="right")
    table.add_column("per arm: success · p50")
    for d in runs:
        try:
            s = Summary.load(d)
            arms = "\n".join(f"{a.name} {num(a.success_rate, '{:.0%}')} · {num(a.latency_p50, '{:.2f}s')}" for a in s.arms)
            row = [Text(d.name), Text(str(s.verdict), style=VERDICT_STYLE.get(str(s.verdict), "bold")), Text(str(s.serve)),
                   Text(str(s.n_pairs)), Text(arms)]
        except Exception:  # noqa: BLE001 - one run's broken files never hide the others
            state = "(unreadable results)" if (d / "decision.json").is_file() else "(not decided)"
            row = [Text(d.name), Text(state, style="dim"), Text(""), Text(""), Text("")]
        table.add_row(*row)
    return table


def _object_runs_table(root: str) -> Table:
    """runs_table for a store on an object store (s3://...): the same columns, read through RunStore."""
    from guided_ab.storage_object import list_object_runs

    run_ids = list_object_runs(root)
    table = Table(title=Text(f"runs in {root}"),
                  caption=None if run_ids else "no runs yet: `guided-ab run configs/local.yaml` starts one")
    for col, kw in (("run id", {"overflow": "fold"}), ("decision", {"no_wrap": True}), ("serve", {"overflow": "fold"}),
                    ("pairs", {"justify": "right"}), ("per arm: success · p50", {})):
        table.add_column(col, **kw)
    for run_id in run_ids:
        rs = RunStore(root, run_id)
        try:
            s = Summary.from_results(rs.read_json("evaluation.json"), rs.read_json("decision.json"), run_id)
            arms = "\n".join(f"{a.name} {num(a.success_rate, '{:.0%}')} · {num(a.latency_p50, '{:.2f}s')}" for a in s.arms)
            row = [Text(run_id), Text(str(s.verdict), style=VERDICT_STYLE.get(str(s.verdict), "bold")), Text(str(s.serve)),
                   Text(str(s.n_pairs)), Text(arms)]
        except Exception:  # noqa: BLE001 - one run's broken files never hide the others
            state = "(unreadable results)" if rs.has("decision.json") else "(not decided)"
            row = [Text(run_id), Text(state, style="dim"), Text(""), Text(""), Text("")]
        table.add_row(*row)
    return table
