"""`guided-ab`: run an experiment, re-run one phase, re-decide, list runs, stop leftovers.

Bad input exits with status 2 and a message naming the field or file; nothing is started.
Prefect is imported only by the commands that run flows, so the others answer quickly.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.style import Style
from rich.text import Text

from guided_ab.config import ConfigError, DecisionOverrides, load_config
from guided_ab.errors import UserError

if TYPE_CHECKING:
    from guided_ab.shutdown import BoundedShutdown
    from guided_ab.store import RunStore

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
# Off a terminal (CI logs, `| tee`, files) rich assumes 80 columns and folds the summary table
# into unreadable slivers; a log line can be as wide as the table needs.
out = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=200)


def _fail(err: Exception | str, code: int = 2) -> None:
    # an error may quote a server (a log tail, an answer): printed as text, never as rich markup
    console.print(Text.assemble(("error:", "bold red"), " ", str(err)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _prefect_defaults() -> None:
    """Defaults that make a local, offline Prefect work on a small machine (user settings win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


STORE_OPT = typer.Option("runs", "--store", help="run store root (the config's `store`)")


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment config, e.g. configs/local.yaml"),
    run_id: str | None = typer.Option(None, help="reuse/resume this run id"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and estimated cost; start nothing"),
) -> None:
    """Run a whole experiment (deploy, observe, A/B, teardown, evaluate, decide) through Prefect."""
    from guided_ab.phases import workload_items
    from guided_ab.store import check_run_id, new_run_id

    try:
        cfg = load_config(config)
        workload_items(cfg)
        if run_id is not None:  # an empty --run-id is refused, never silently replaced by a new one
            check_run_id(run_id)
    except ConfigError as err:
        _fail(err)
    if dry_run:
        from guided_ab.dry_run import describe_plan

        out.print(describe_plan(cfg), highlight=False, soft_wrap=True, markup=False)
        return
    from guided_ab.storage import probe_store

    try:  # an object store that cannot be written stops the run here, before Prefect or any arm starts
        probe_store(cfg.store)
    except ConfigError as err:
        _fail(err)
    _prefect_defaults()
    # The result line must be the last line of output: Prefect stops its temporary server (and
    # logs that) from an exit handler, so print ours from one registered earlier (they run LIFO).
    final_line: list[str] = []
    atexit.register(lambda: final_line and print(final_line[0], flush=True))
    from flows.experiment import experiment

    run_id = run_id or new_run_id(cfg.name)  # known here: a Ctrl-C must be able to tear this run down
    shutdown = _shutdown(cfg.store, run_id)
    try:
        with shutdown:
            result = experiment(config_path=str(config), run_id=run_id)
    except KeyboardInterrupt:  # records kept, endpoints stopped, teardown.json written, exit 130
        shutdown.finish_and_exit()
    except UserError as err:  # bad input or a run missing what a phase needs (RunStateError): exit 2
        _fail(err)
    except Exception as err:  # the flow failed: say why, records stay in the store
        if shutdown.fired:  # an interrupt that surfaced as another error on its way out
            shutdown.finish_and_exit()
        _fail(f"the experiment failed: {err}", code=1)
    _print_summary(result["store"])
    final_line.append(f"run_id={result['run_id']} decision={result['decision']} store={result['store']}")


def _shutdown(store: str, run_id: str, resume: str | None = None) -> BoundedShutdown:
    """Ctrl-C while a flow runs: bounded, even when Prefect's API died with it (guided_ab/shutdown.py)."""
    from guided_ab.shutdown import BoundedShutdown, finish_run

    def say(message: str) -> None:
        console.print(Text(message), highlight=False, soft_wrap=True)

    return BoundedShutdown(lambda: finish_run(store, run_id, say, resume), say=say)


def _print_summary(run_dir: str | Path | RunStore) -> None:
    """The summary table of a run: its directory, its store, or a flow result's `store` (a directory or
    an object store URL ending in the run id)."""
    from guided_ab.reports.console import summary_table
    from guided_ab.storage import is_object_store
    from guided_ab.store import RunStore

    try:
        if isinstance(run_dir, str) and is_object_store(run_dir):
            root, _, run_id = run_dir.rstrip("/").rpartition("/")
            run_dir = RunStore(root, run_id)
        out.print(summary_table(run_dir if isinstance(run_dir, RunStore) else Path(run_dir)))
    except Exception as err:  # a summary must never hide the result line
        console.print(Text(f"(no summary table: {err})"))


@app.command()
def evaluate(
    run_id: str = typer.Option(..., "--run-id"),
    store: str = STORE_OPT,
    success_margin: float | None = typer.Option(None, help="candidate success may be this much lower"),
    latency_margin: float | None = typer.Option(None, help="candidate p50 may be this much slower (0.1 = 10%)"),
    backend_share_min: float | None = typer.Option(None),
    expected_backend: str | None = typer.Option(None),
    max_cv_ratio: float | None = typer.Option(None),
    alpha: float | None = typer.Option(None),
    bootstrap_resamples: int | None = typer.Option(None),
) -> None:
    """Re-evaluate and re-decide a finished run offline (no endpoint is touched)."""
    from guided_ab import phases
    from guided_ab.store import RunStore

    try:
        overrides = DecisionOverrides(
            success_margin=success_margin, latency_margin=latency_margin, backend_share_min=backend_share_min,
            expected_backend=expected_backend, max_cv_ratio=max_cv_ratio, alpha=alpha,
            bootstrap_resamples=bootstrap_resamples,
        )
        rs = RunStore.open(store, run_id)
        phases.evaluate_run(rs, overrides)
        decision = phases.decide_run(rs, overrides)
    except ValueError as err:  # UserError (ConfigError, RunStateError) and pydantic's validation errors
        _fail(err)
    _print_summary(rs)
    print(f"run_id={run_id} decision={decision['verdict']} store={rs.location}")


def _phase_command(name: str, flow_path: str, doc: str):
    def command(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
        from guided_ab.store import RunStore

        try:
            RunStore.open(store, run_id)
        except ConfigError as err:
            _fail(err)
        _prefect_defaults()
        module, fn = flow_path.rsplit(".", 1)
        import importlib

        flow_fn = getattr(importlib.import_module(module), fn)
        shutdown = _shutdown(store, run_id)
        try:
            with shutdown:
                result = flow_fn(run_id=run_id, store=store)
        except KeyboardInterrupt:
            shutdown.finish_and_exit()
        except UserError as err:  # e.g. RunStateError: "run the deploy phase first", PhaseLocked; exit 2
            _fail(err)
        except Exception as err:
            if shutdown.fired:
                shutdown.finish_and_exit()
            _fail(f"phase {name} failed: {err}", code=1)
        out.print(result)

    command.__doc__ = doc
    app.command(name=name)(command)


_phase_command("deploy", "flows.deploy.deploy", "Phase deploy: start the run's endpoints and wait for them.")
_phase_command("observe", "flows.observe.observe", "Phase observe: send (the rest of) the observe plan.")
_phase_command("ab", "flows.ab.ab", "Phase A/B: send (the rest of) the paired A/B plan; resumes without duplicates.")
_phase_command("decide-teardown", "flows.decide_teardown.decide_teardown", "Phase decide/teardown: stop the run's endpoints and decide.")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="experiment config, e.g. configs/local.yaml (its `sweep` block, or the defaults)"),
    run_id: str | None = typer.Option(None, help="resume this sweep run (complete steps are kept)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what the sweep will send; start nothing"),
) -> None:
    """Rate sweep through Prefect: per arm, one at a time, the closed-loop maximum, then a ladder of
    open-loop rates up to and past it; the knee, and sweep-report.html with the curves."""
    from guided_ab.phases import workload_items
    from guided_ab.store import check_run_id, new_run_id
    from guided_ab.sweep import describe

    try:
        cfg = load_config(config)
        workload_items(cfg)
        if run_id is not None:
            check_run_id(run_id)
    except ConfigError as err:
        _fail(err)
    if dry_run:
        out.print(describe(cfg), highlight=False, soft_wrap=True, markup=False)
        return
    _prefect_defaults()
    final_line: list[str] = []  # printed after Prefect's exit handlers (see `run`)
    atexit.register(lambda: final_line and print(final_line[0], flush=True))
    from flows.sweep import sweep as sweep_flow
    from guided_ab.reports.sweep_report import knee_text

    run_id = run_id or new_run_id(f"{cfg.name}-sweep"[:60])
    shutdown = _shutdown(cfg.store, run_id, resume=f"guided-ab sweep {config} --run-id {run_id}")
    try:
        with shutdown:
            result = sweep_flow(config_path=str(config), run_id=run_id)
    except KeyboardInterrupt:  # records kept, endpoints stopped, exit 130; `--run-id` resumes
        shutdown.finish_and_exit()
    except UserError as err:
        _fail(err)
    except Exception as err:
        if shutdown.fired:
            shutdown.finish_and_exit()
        _fail(f"the sweep failed: {err}", code=1)
    import json

    summary = json.loads((Path(result["store"]) / "sweep.json").read_text())
    for arm, a in summary["arms"].items():
        out.print(knee_text(arm, a), highlight=False, soft_wrap=True, markup=False)
    knees = ",".join(f"{arm}:{'none' if r is None else f'{r:.3g}'}" for arm, r in result["knees"].items())
    final_line.append(f"run_id={result['run_id']} knees={knees} report={result['report']}")


@app.command(name="continue")
def continue_(
    run_id: str = typer.Option(..., "--run-id"),
    max_pairs: int = typer.Option(..., "--max-pairs", help="the new cap: A/B pairs in all, more than the run has"),
    pairs_per_look: int | None = typer.Option(None, "--pairs-per-look", help="pairs per look (default: the config's, or the run's pairs)"),
    store: str = STORE_OPT,
    force: bool = typer.Option(False, "--force", help="also continue a run that is unfinished or not inconclusive"),
) -> None:
    """Give a finished inconclusive run more A/B pairs (sequential looks from now on) and decide again."""
    from guided_ab.looks import check_continuable
    from guided_ab.store import RunStore

    try:
        if pairs_per_look is not None and pairs_per_look < 1:
            raise ConfigError("--pairs-per-look must be at least 1")
        check_continuable(RunStore.open(store, run_id), max_pairs, force)
    except UserError as err:  # not found, not finished, not inconclusive, nothing to add: exit 2
        _fail(err)
    _prefect_defaults()
    final_line: list[str] = []
    atexit.register(lambda: final_line and print(final_line[0], flush=True))
    from flows.continue_run import continue_run

    try:
        result = continue_run(run_id=run_id, max_pairs=max_pairs, store=store, pairs_per_look=pairs_per_look, force=force)
    except UserError as err:
        _fail(err)
    except Exception as err:
        _fail(f"the continuation failed: {err}", code=1)
    _print_summary(result["store"])
    final_line.append(f"run_id={run_id} decision={result['decision']} continued={result['continued']} store={result['store']}")


@app.command()
def teardown(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
    """Stop every endpoint a run started (no Prefect needed)."""
    from guided_ab import phases
    from guided_ab.store import RunStore

    try:
        rs = RunStore.open(store, run_id)
        entries = phases.teardown(rs, log=lambda m: console.print(Text(m)))
    except UserError as err:  # not found, a damaged endpoints.json
        _fail(err)
    for entry in entries:
        out.print(entry)


@app.command()
def reap(
    older_than: float = typer.Option(0.0, help="only servers started more than this many seconds ago"),
    run_id: str | None = typer.Option(None, "--run-id"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list, do not stop"),
    modal_prefix: str | None = typer.Option(
        None, help="also stop deployed Modal apps whose name starts with this (e.g. 'gab-'); needs a Modal token"
    ),
    force: bool = typer.Option(False, "--force", help="also stop servers of experiments that are still running"),
) -> None:
    """Stop local vLLM servers left behind by crashed runs, and (with --modal-prefix) old Modal apps."""
    from guided_ab.arms.reaper import reap_everything

    if dry_run:
        from guided_ab.arms import local

        for rec in local.leftovers():
            out.print(rec)
        return
    stopped = reap_everything(run_id=run_id, older_than_s=older_than, modal_prefix=modal_prefix, force=force,
                              log=lambda m: out.print(Text(m)))
    print(f"reaped={len(stopped)}")


@app.command()
def cost(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
    """Estimated vs billed: Modal's billing report for the run's apps (by tag) beside the estimate;
    written to the run store as cost.json. Needs a Modal token; without one it says it cannot."""
    from guided_ab.arms.modal_billing import NoBilling, estimated, reconcile
    from guided_ab.store import RunStore

    try:
        rs = RunStore.open(store, run_id)
    except ConfigError as err:
        _fail(err)
    try:
        result = reconcile(rs)
    except NoBilling as err:
        for arm, a in estimated(rs).items():
            out.print(f"{arm}: {a['target']}, held {a['held_h']:.2f} h, estimated ${a['estimated_usd']:.2f}, billed unknown")
        _fail(err, code=1)
    for arm, a in result["arms"].items():
        billed = "-" if a["billed_usd"] is None else f"${a['billed_usd']:.2f}"
        parts = ", ".join(f"{k} ${v:.2f}" for k, v in sorted(a["billed_by_resource"].items()))
        out.print(f"{arm}: {a['target']}, held {a['held_h']:.2f} h, estimated ${a['estimated_usd']:.2f}, billed {billed}"
                  + (f" ({parts})" if parts else ""), highlight=False)
    if result["complete"] is False:
        out.print("Modal's report leaves out the hour still running: billed figures are partial until it ends")
    t = result["total"]
    billed = "unknown" if t["billed_usd"] is None else f"{t['billed_usd']:.4f}"
    print(f"run_id={run_id} estimated_usd={t['estimated_usd']:.4f} billed_usd={billed} source={result['source']!r}")


@app.command()
def runs(store: str = STORE_OPT) -> None:
    """List past runs with their decision and key metrics."""
    from guided_ab.reports.console import runs_table

    out.print(runs_table(store))


@app.command()
def report(
    run_id: str = typer.Argument(..., help="run id (`guided-ab runs` lists them), or 'latest'"),
    store: str = STORE_OPT,
    open_browser: bool = typer.Option(False, "--open", help="open report.html in the default browser"),
    html_only: bool = typer.Option(False, "--html", help="print only the path of report.html"),
) -> None:
    """Print a run's report (decision, criteria, arms) and where its HTML report is; --open opens it."""
    from guided_ab.storage import is_object_store
    from guided_ab.store import RunStore, list_runs

    try:
        if run_id == "latest":
            if is_object_store(store):
                from guided_ab.storage_object import list_object_runs

                found_ids = list_object_runs(store)
            else:
                found_ids = [d.name for d in list_runs(store)]
            if not found_ids:
                _fail(f"no runs under {store if is_object_store(store) else Path(store).resolve()}: `guided-ab run configs/local.yaml` starts one")
            run_id = found_ids[0]
        rs = RunStore.open(store, run_id)
    except ConfigError as err:
        _fail(err)
    if not rs.has("decision.json"):
        _fail(f"run {run_id} has no decision yet: run `guided-ab evaluate --run-id {run_id} --store {store}` first")
    if not rs.has("report.html") or not rs.has("report.md"):  # a run decided before the HTML report existed
        from guided_ab.reports.files import write_reports

        try:
            with console.status("writing the report ..."):
                write_reports(rs, rs.load_config(), rs.read_json("evaluation.json"), rs.read_json("decision.json"))
        except (UserError, OSError) as err:  # a broken config.yaml, a missing evaluation.json
            _fail(f"cannot write the report of run {run_id}: {err}")
        except Exception as err:  # noqa: BLE001 - damaged results: say so, no traceback
            _fail(f"cannot write the report of run {run_id} (its results look damaged): {type(err).__name__}: {err}", code=1)
    html = _local_report(rs)
    if html_only:
        print(html if html is not None else rs.uri("report.html"))
        return
    from rich.markdown import Markdown

    out.print(Markdown(rs.read_text("report.md")))
    _print_summary(rs)
    if html is None:  # a run in an object store, not copied here: its URL
        out.print(Text(f"HTML report (plots): {rs.uri('report.html')} (`--open` copies it here and opens it)"), highlight=False)
        if not open_browser:
            return
        html = _local_report(rs, download=True)
        assert html is not None
    out.print(Text.assemble("HTML report (plots): ", (str(html), Style(link=html.as_uri()))), highlight=False)
    if open_browser:
        import webbrowser

        if not webbrowser.open(html.as_uri()):
            console.print(Text(f"no browser to open here; copy {html} to a machine with one"))


def _local_report(rs: RunStore, download: bool = False) -> Path | None:
    """report.html on this machine: the run directory's, or (a run in an object store, `download`)
    a copy with its plot PNGs in the run's machine-local directory; None for an object store otherwise."""
    if rs.location == str(rs.dir):
        return rs.path("report.html")
    if not download:
        return None
    from guided_ab.reports.plots import KEY_PLOTS

    copy = rs.dir / "report"
    copy.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", *KEY_PLOTS):
        if rs.has(name):
            (copy / name).write_bytes(rs.read_bytes(name))
    return copy / "report.html"


@app.command()
def simulate(
    experiments: int = typer.Option(400, "--experiments", help="synthetic experiments in all, spread over the scenarios"),
    seed: int = typer.Option(0, help="root seed (each experiment gets its own, spawned from it)"),
    workers: int = typer.Option(2, help="processes"),
    resamples: int = typer.Option(1000, help="bootstrap resamples per evaluation"),
    look: int = typer.Option(20, help="pairs per look (sequential rule and naive peeking)"),
    pairs: int | None = typer.Option(None, help="cap of every scenario in pairs (default: 200)"),
    max_pairs: int | None = typer.Option(None, help="the sequential rule's cap, if larger than the scenarios' cap"),
    scenario: list[str] | None = typer.Option(None, "--scenario", help="run only these scenarios (repeatable)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write every number as JSON here"),
    truth_pairs: int = typer.Option(400_000, help="pairs in each scenario's Monte-Carlo truth sample"),
) -> None:
    """Decision rules on synthetic experiments with known truth: interval coverage, wrong and
    inconclusive decisions, the sequential rule's pairs. The last line is the headline."""
    import json

    from rich.progress import Progress

    from guided_ab.analysis import simulate_summary as summary
    from guided_ab.analysis.simulate import simulate as run_sim

    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("synthetic experiments", total=experiments)
            res = run_sim(experiments, seed=seed, resamples=resamples, workers=workers, look=look, pairs=pairs, max_pairs=max_pairs,
                          scenarios=tuple(scenario) if scenario else None, truth_pairs=truth_pairs,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (KeyError, ValueError) as err:
        _fail(err)
    for table in summary.tables(res):
        out.print(table)
    out.print(f"{res['experiments']} experiments in {res['wall_s']:.0f} s (truths {res['truth_s']:.0f} s), "
              f"{workers} processes, {resamples} bootstrap resamples", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    print(summary.sequences_line(res))
    print(summary.naive_line(res))
    print(summary.final_line(res), flush=True)


@app.command()
def selfcheck(
    with_vllm: bool = typer.Option(False, "--with-vllm", help="also SIGKILL a real local vLLM server mid-phase (needs .venv-vllm)"),
    with_prefect: bool = typer.Option(False, "--with-prefect", help="also SIGKILL a real Prefect `ab` flow process mid-run"),
    keep: bool = typer.Option(False, "--keep", help="keep the sandbox directory (runs, logs) for inspection"),
    workdir: Path | None = typer.Option(None, "--dir", help="sandbox directory to use (kept)"),
    only: list[str] | None = typer.Option(None, "--only", help="run only these scenarios (repeatable)"),
) -> None:
    """Run the fault and bad-input scenarios against a loopback fault server; exit 0 only if all held."""
    from guided_ab.selfcheck.run import selfcheck as run_selfcheck

    code = run_selfcheck(with_vllm=with_vllm, with_prefect=with_prefect, keep=keep, workdir=workdir, only_names=only,
                         echo=lambda line: print(line, flush=True))
    raise typer.Exit(code)


# -- phase 3: promote, monitor, keep or revert (guided_ab/promote.py, guided_ab/monitor.py) ----------
def _run_flow(flow_path: str, what: str, **params: object) -> dict:
    import importlib

    _prefect_defaults()
    module, fn = flow_path.rsplit(".", 1)
    try:
        result: dict = getattr(importlib.import_module(module), fn)(**params)
    except UserError as err:  # not promoted, not a switch, window closed, no production block: exit 2
        _fail(err)
    except Exception as err:
        _fail(f"{what} failed: {err}", code=1)
    return result


@app.command()
def promote(
    run_id: str = typer.Option(..., "--run-id"),
    store: str = STORE_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="show exactly what would change; deploy and record nothing"),
) -> None:
    """Promote a `switch` run's winner to production (config `production`) and open its monitoring window."""
    from guided_ab import promote as P
    from guided_ab.store import RunStore

    if dry_run:
        try:
            out.print(P.promote(RunStore.open(store, run_id), dry_run=True)["text"], highlight=False, markup=False)
        except UserError as err:
            _fail(err)
        return
    result = _run_flow("flows.promote.promote", "promote", run_id=run_id, store=store)
    print(f"run_id={run_id} promoted={result['serve']} status={result['status']}")


@app.command()
def monitor(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
    """One monitoring run: a paired sample to production and the live control; the window judged so far."""
    result = _run_flow("flows.monitor.monitor", "the monitoring run", run_id=run_id, store=store)
    if not result["ran"]:
        print(f"run_id={run_id} window closed ({result['status']}) verdict={result['verdict']}")
        return
    out.print(result["reason"], highlight=False, markup=False)
    print(f"run_id={run_id} monitoring_run={result['run']}/{result['planned_runs']} verdict={result['verdict']}")


@app.command()
def revert(
    run_id: str = typer.Option(..., "--run-id"),
    store: str = STORE_OPT,
    reason: str = typer.Option("", "--reason", help="why (recorded in promotion.json)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would change; deploy and record nothing"),
) -> None:
    """Re-deploy the control's configuration as production and stop the live control."""
    from guided_ab import promote as P
    from guided_ab.store import RunStore

    if dry_run:
        try:
            out.print(P.revert(RunStore.open(store, run_id), dry_run=True)["text"], highlight=False, markup=False)
        except UserError as err:
            _fail(err)
        return
    result = _run_flow("flows.revert.revert", "the revert", run_id=run_id, store=store, reason=reason)
    out.print(result["text"], highlight=False, markup=False)
    print(f"run_id={run_id} status={result['status']}")


@app.command(name="monitor-report")
def monitor_report(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
    """Write monitor-report.html (the window's runs and running intervals) and print its path."""
    from guided_ab.monitor import write_report
    from guided_ab.store import RunStore

    try:
        print(write_report(RunStore.open(store, run_id)))
    except UserError as err:
        _fail(err)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
