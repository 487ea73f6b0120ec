"""`guided-ab`: run an experiment, re-run one phase, re-decide, list runs, stop leftovers.

Bad input exits with status 2 and a message naming the field or file; nothing is started.
Prefect is imported only by the commands that run flows, so the others answer quickly.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from guided_ab.config import ConfigError, DecisionOverrides, load_config
from guided_ab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
# Off a terminal (CI logs, `| tee`, files) rich assumes 80 columns and folds the summary table
# into unreadable slivers; a log line can be as wide as the table needs.
out = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=200)


def _fail(err: Exception | str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False)
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
    from guided_ab.store import check_run_id

    try:
        cfg = load_config(config)
        workload_items(cfg)
        if run_id:
            check_run_id(run_id)
    except ConfigError as err:
        _fail(err)
    if dry_run:
        from guided_ab.dry_run import describe_plan

        out.print(describe_plan(cfg), highlight=False, soft_wrap=True)
        return
    _prefect_defaults()
    # The result line must be the last line of output: Prefect stops its temporary server (and
    # logs that) from an exit handler, so print ours from one registered earlier (they run LIFO).
    final_line: list[str] = []
    atexit.register(lambda: final_line and print(final_line[0], flush=True))
    from flows.experiment import experiment

    try:
        result = experiment(config_path=str(config), run_id=run_id)
    except UserError as err:  # bad input or a run missing what a phase needs (RunStateError): exit 2
        _fail(err)
    except Exception as err:  # the flow failed: say why, records stay in the store
        _fail(f"the experiment failed: {err}", code=1)
    _print_summary(Path(result["store"]))
    final_line.append(f"run_id={result['run_id']} decision={result['decision']} store={result['store']}")


def _print_summary(run_dir: Path) -> None:
    from guided_ab.reports.console import summary_table

    try:
        out.print(summary_table(run_dir))
    except Exception as err:  # a summary must never hide the result line
        console.print(f"(no summary table: {err})")


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
    _print_summary(rs.dir)
    print(f"run_id={run_id} decision={decision['verdict']} store={rs.dir}")


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
        try:
            result = flow_fn(run_id=run_id, store=store)
        except UserError as err:  # e.g. RunStateError: "run the deploy phase first"; exit 2
            _fail(err)
        except Exception as err:
            _fail(f"phase {name} failed: {err}", code=1)
        out.print(result)

    command.__doc__ = doc
    app.command(name=name)(command)


_phase_command("deploy", "flows.deploy.deploy", "Phase deploy: start the run's endpoints and wait for them.")
_phase_command("observe", "flows.observe.observe", "Phase observe: send (the rest of) the observe plan.")
_phase_command("ab", "flows.ab.ab", "Phase A/B: send (the rest of) the paired A/B plan; resumes without duplicates.")
_phase_command("decide-teardown", "flows.decide_teardown.decide_teardown", "Phase decide/teardown: stop the run's endpoints and decide.")


@app.command()
def teardown(run_id: str = typer.Option(..., "--run-id"), store: str = STORE_OPT) -> None:
    """Stop every endpoint a run started (no Prefect needed)."""
    from guided_ab import phases
    from guided_ab.store import RunStore

    try:
        rs = RunStore.open(store, run_id)
    except ConfigError as err:
        _fail(err)
    for entry in phases.teardown(rs, log=lambda m: console.print(m)):
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
    stopped = reap_everything(run_id=run_id, older_than_s=older_than, modal_prefix=modal_prefix, force=force, log=out.print)
    print(f"reaped={len(stopped)}")


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
    from guided_ab.store import RunStore, list_runs

    if run_id == "latest":
        found = list_runs(store)
        if not found:
            _fail(f"no runs under {Path(store).resolve()}: `guided-ab run configs/local.yaml` starts one")
        run_id = found[0].name
    try:
        rs = RunStore.open(store, run_id)
    except ConfigError as err:
        _fail(err)
    if not rs.has("decision.json"):
        _fail(f"run {run_id} has no decision yet: run `guided-ab evaluate --run-id {run_id} --store {store}` first")
    html = rs.path("report.html")
    if not html.is_file() or not rs.has("report.md"):  # a run decided before the HTML report existed
        from guided_ab.reports.files import write_reports

        try:
            with console.status("writing the report ..."):
                write_reports(rs, rs.load_config(), rs.read_json("evaluation.json"), rs.read_json("decision.json"))
        except (ConfigError, OSError) as err:
            _fail(f"cannot write the report of run {run_id}: {err}")
    if html_only:
        print(html)
        return
    from rich.markdown import Markdown

    out.print(Markdown(rs.path("report.md").read_text()))
    _print_summary(rs.dir)
    out.print(f"HTML report (plots): [link={html.as_uri()}]{html}[/link]", highlight=False)
    if open_browser:
        import webbrowser

        if not webbrowser.open(html.as_uri()):
            console.print(f"no browser to open here; copy {html} to a machine with one")


@app.command()
def simulate(experiments: int = typer.Option(400, "--experiments"), seed: int = 0, pairs: int = 200) -> None:
    """Run synthetic experiments with known truth: interval coverage and decision error rates."""
    from guided_ab.analysis.simulate import simulate as run_sim

    res = run_sim(experiments, seed=seed, pairs=pairs)
    for k, v in res.items():
        if k not in ("coverage", "wrong_decisions"):
            out.print(f"{k}: {v}")
    print(f"coverage={res['coverage']:.3f} wrong_decisions={res['wrong_decisions']:.3f}")


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
