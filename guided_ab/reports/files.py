"""A run's report files: report.md, report.html and the key-plot PNGs, written into the run directory.

The one module that uses both the markdown and the HTML output (they never import each other).
report.md is written first, from the results alone: a failing HTML report (unreadable records,
say) never costs it. Then the HTML page and the PNGs of the key plots, drawn once for both;
report.md is rewritten with links to the PNGs last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guided_ab.config import ExperimentConfig
from guided_ab.reports.html import render_html
from guided_ab.reports.markdown import plots_markdown, render_markdown
from guided_ab.reports.model import ReportModel, build_report
from guided_ab.reports.plots import render_all
from guided_ab.store import RunStore


def write_reports(store: RunStore, cfg: ExperimentConfig, evaluation: dict[str, Any], decision: dict[str, Any]) -> None:
    """report.md, then report.html and the key-plot PNGs, then report.md with its plots section."""
    model = build_report(cfg, evaluation, decision, store.run_id)
    md = render_markdown(model)
    store.write_text("report.md", md)  # first: a failing HTML report never costs this one
    model = _with_records(store, model)
    _write_html(store, model)
    # rendered again from the model with its records: the per-replica section needs them
    store.write_text("report.md", render_markdown(model) + plots_markdown(store.has))


def write_html_report(store: RunStore, cfg: ExperimentConfig, evaluation: dict[str, Any], decision: dict[str, Any]) -> Path:
    """Write report.html (and the key-plot PNGs) into the run directory; returns the HTML path."""
    return _write_html(store, _with_records(store, build_report(cfg, evaluation, decision, store.run_id)))


def _with_records(store: RunStore, model: ReportModel) -> ReportModel:
    return model.with_records(store.records(), store.read_json("teardown.json", default={"arms": []}))


def _write_html(store: RunStore, model: ReportModel) -> Path:
    """report.html and the key-plot PNGs of a model that has its records (_with_records)."""
    plots = render_all(model)
    page = render_html(model, plots)
    for r in plots.values():
        if r.png is not None and r.plot.png:
            store.write_bytes(r.plot.png, r.png)  # through the store: a local directory or an object store
    store.write_text("report.html", page)
    return store.path("report.html") if store.location == str(store.dir) else Path("report.html")
