"""The CLI's tables (rich): a run's summary after `guided-ab run`, and the list of past runs
(`guided-ab runs`). Both read only evaluation.json and decision.json, through the report model's
Summary: listing many runs never loads their records.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from guided_ab.reports.format import num
from guided_ab.reports.model import Summary
from guided_ab.store import list_runs

VERDICT_STYLE = {"switch": "bold green", "keep": "bold blue", "inconclusive": "bold yellow", "invalid": "bold red"}
SUMMARY_COLUMNS = ("arm", "backend (configured)", "n", "success rate [95% CI]", "latency p50 s", "latency p95 s",
                   "backend used", "failures")


def summary_table(run_dir: Path) -> Table:
    """Per arm: configured backend, n, success rate, p50/p95 latency, backend used, failures."""
    s = Summary.load(run_dir)
    # every cell is Text: backends, failure classes and verdicts come from server answers and
    # run files, and a `[/bold]` in one must print as itself, never as rich markup
    table = Table(title=Text(f"{run_dir.name}: {s.verdict_text}"),
                  caption=Text("\n".join(s.hypotheses)) if s.hypotheses else None)
    for c in SUMMARY_COLUMNS:
        # numbers and their intervals never break across lines; the failure list may
        table.add_column(c, no_wrap=c != "failures")
    for r in s.arm_rows:
        table.add_row(*(Text(str(r[c])) for c in SUMMARY_COLUMNS))
    return table


def runs_table(root: str | Path) -> Table:
    """Past runs, newest first (the run id holds the start time): decision, what to serve, pairs,
    per-arm success rate and p50 latency."""
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
