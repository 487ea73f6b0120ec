"""Bad run ids and damaged run directories (issue 17): a run id with a trailing newline, an
empty `--run-id`, a damaged decision.json, config.yaml, endpoints.json, teardown.json, plan,
journal, attempt log or parquet. Each is a real attempt through the entry point a user would
take (RunStore, the phases, the CLI's commands) and must end in a message naming the file, or
in a run that still completes exactly, never in a traceback or a lost record.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Callable
from typing import Any

from guided_ab.config import parse_config
from guided_ab.errors import UserError
from guided_ab.selfcheck.bad_inputs import refused
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.selfcheck.harness import Failed, PhaseRun, Sandbox, account, expect, run_phase
from guided_ab.store import RunStore


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from guided_ab.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})


def _finished(sb: Sandbox, name: str) -> PhaseRun:
    """A decided run on a healthy loopback server (deploy, A/B, teardown, evaluate, decide)."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key) as srv:
        run = run_phase(sb, name, srv.url, srv.url, size=2)
    phases.decide_run(run.store)
    return run


def _exit_2_naming(result: Any, *needles: str) -> str:
    out = " ".join(result.output.split())
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise Failed(f"{type(result.exception).__name__} instead of a message: {str(result.exception)[:200]}")
    expect(result.exit_code == 2, f"exit status {result.exit_code}: {out[:200]}")
    missing = [n for n in needles if n not in out]
    expect(not missing, f"the message does not name {missing}: {out[:300]}")
    return out[:150]


def bad_run_id_newline(sb: Sandbox) -> str:
    cfg = parse_config(sb.config_data("newline", "http://127.0.0.1:9", "http://127.0.0.1:9"), "selfcheck")
    RunStore.create(cfg, "newline-run")
    refused(lambda: RunStore.create(cfg, "newline-run\n"), "run id")
    return refused(lambda: RunStore.open(sb.store, "newline-run\n"), "run id")


def bad_run_id_empty(sb: Sandbox) -> str:
    import yaml

    p = sb.inputs / "empty-run-id.yaml"
    p.write_text(yaml.safe_dump(sb.config_data("emptyid", "http://127.0.0.1:9", "http://127.0.0.1:9")))
    before = sorted(x.name for x in sb.store.iterdir())
    out = _exit_2_naming(_cli("run", str(p), "--run-id", "", "--dry-run"), "run id")
    expect(sorted(x.name for x in sb.store.iterdir()) == before, "a run was created")
    return out


def bad_run_id_long(sb: Sandbox) -> str:
    cfg = parse_config(sb.config_data("longid", "http://127.0.0.1:9", "http://127.0.0.1:9"), "selfcheck")
    return refused(lambda: RunStore.create(cfg, "r" * 101), "run id")


def bad_decision_json(sb: Sandbox) -> str:
    from rich.console import Console

    from guided_ab.reports.console import runs_table

    good, bad = _finished(sb, "decided"), _finished(sb, "damaged")
    for text in ("{not json", "[]", '{"verdict": {"x": 1}, "arms": 5}', ""):
        bad.store.path("decision.json").write_text(text)
        term = Console(width=300, color_system=None, file=io.StringIO())
        term.print(runs_table(sb.store))
        shown = term.file.getvalue()  # type: ignore[attr-defined]
        expect(good.store.run_id in shown and bad.store.run_id in shown, "a run is missing from the list")
    return f"4 damaged decision.json: `runs` still lists every run ({bad.store.run_id} as unreadable)"


def bad_run_config(sb: Sandbox) -> str:
    run = _finished(sb, "badconfig")
    p = run.store.path("config.yaml")
    p.write_text("name: [unclosed\n")
    from guided_ab import phases

    refused(lambda: phases.evaluate_run(run.store), str(p), "not valid YAML")
    return _exit_2_naming(_cli("evaluate", "--run-id", run.store.run_id, "--store", str(sb.store)), "config.yaml")


def bad_missing_evaluation(sb: Sandbox) -> str:
    run = _finished(sb, "noeval")
    run.store.path("report.html").unlink()
    run.store.path("evaluation.json").unlink()
    return _exit_2_naming(_cli("report", run.store.run_id, "--store", str(sb.store)), "evaluation.json")


def bad_endpoints_json(sb: Sandbox) -> str:
    from guided_ab import phases

    run = _finished(sb, "badendpoints")
    for text in ("{oops", '{"control": 5}', '{"control": {"target": "k8s"}}', "[1]"):
        run.store.path("endpoints.json").write_text(text)
        refused(lambda: phases.teardown(run.store, log=sb.log), "endpoints.json", error=UserError)
        refused(lambda: phases.run_requests(run.cfg, run.store, "ab"), "endpoints.json", error=UserError)
    return "4 damaged endpoints.json: teardown and ab name the file; " + \
        _exit_2_naming(_cli("teardown", "--run-id", run.store.run_id, "--store", str(sb.store)), "endpoints.json")


def bad_teardown_json(sb: Sandbox) -> str:
    from guided_ab import phases

    run = _finished(sb, "badteardown")
    run.store.path("teardown.json").write_text("{half")
    entries = phases.teardown(run.store, log=sb.log)  # must still stop (and record) every endpoint
    expect({e["arm"] for e in entries} == {"control", "candidate"}, f"teardown entries {entries}")
    expect(json.loads(run.store.path("teardown.json").read_text())["arms"], "teardown.json was not written anew")
    return "a damaged teardown.json: every endpoint still stopped, teardown.json written anew"


def bad_plan_schema(sb: Sandbox) -> str:
    """A plan whose schema the validator cannot use (edited after it was checked): the answers
    are `validation_error` records, the phase completes and resumes to nothing."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key) as srv:
        cfg = sb.config("badplan", srv.url, srv.url, size=3)
        store = RunStore.create(cfg, f"badplan-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sb.log)
        plan = phases.build_plans(cfg, store)
        data = store.read_json("plan-ab.json")
        broken = next(k for k in data["items"] if not k.startswith("warmup"))
        data["items"][broken]["json_schema"] = {"type": "object", "required": ["name"],
                                                "properties": {"name": {"$ref": "#/$defs/nope"}}}
        store.write_json("plan-ab.json", data)
        phases.run_requests(cfg, store, "ab")
        again = phases.run_requests(cfg, store, "ab")
        phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan["ab"]))
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned and again.sent_now == 0, acc.describe())
    recs = store.journal("ab")
    bad = {r.outcome for r in recs if r.schema_id == broken}
    expect(bad == {"validation_error"}, f"records of the broken schema: {bad}")
    expect({r.outcome for r in recs if r.schema_id != broken} == {"success"}, "another schema did not succeed")
    phases.evaluate_run(store)
    return f"{acc.describe()}, 0 lost; the broken schema's answers are validation_error, the rest success; evaluated"


def _completed(sb: Sandbox, name: str, damage: Callable[[RunStore], None]) -> str:
    """A run whose records files are damaged after it completed: a re-run sends nothing more
    (or exactly what is missing) and the evaluation still accounts for every request."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key) as srv:
        run = run_phase(sb, name, srv.url, srv.url, size=3)
        damage(run.store)
        again = phases.run_requests(run.cfg, run.store, "ab")
    evaluation = phases.evaluate_run(run.store)
    acc = sb.tally(account(run.store, run.plan))
    gates = {g["name"]: g["passed"] for g in evaluation["gates"]}
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned, acc.describe())
    expect(bool(gates.get("request_accounting") and gates.get("unique_requests")), f"gates {gates}")
    return f"re-run sent {again.sent_now}; {acc.describe()}, 0 lost, 0 dup; accounting gates passed"


def _garbage_lines(store: RunStore) -> None:
    p = store.journal_path("ab")
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(b"".join([lines[0], b"not json at all\n", b"{}\n", b'{"request_id": 5, "outcome": 1}\n', *lines[1:]]))


def _garbage_sent(store: RunStore) -> None:
    p = store.path("records", "ab.sent")
    p.write_bytes(p.read_bytes() + b"\xff\xfe\x00garbage\n")


def bad_parquet(sb: Sandbox) -> str:
    """A damaged parquet, newer than its journal: the records are read from the journal instead."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key) as srv:
        run = run_phase(sb, "parquet", srv.url, srv.url, size=3)
    run.store.path("records", "ab.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    evaluation = phases.evaluate_run(run.store)
    gates = {g["name"]: g["passed"] for g in evaluation["gates"]}
    expect(bool(gates.get("request_accounting") and gates.get("unique_requests")), f"gates {gates}")
    n = sum(a.get("n", 0) for a in evaluation.get("arms", {}).values())
    return f"evaluated from the journal ({n} A/B records), accounting gates passed"


def bad_config_dir(sb: Sandbox) -> str:
    run_dir = sb.store / "config-is-a-dir"
    (run_dir / "config.yaml").mkdir(parents=True)
    return refused(lambda: RunStore.open(sb.store, "config-is-a-dir"), "not found", "config-is-a-dir")


BAD_INPUTS: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("run-id-trailing-newline", bad_run_id_newline),
    ("run-id-empty", bad_run_id_empty),
    ("run-id-101-chars", bad_run_id_long),
    ("decision-json-damaged", bad_decision_json),
    ("run-config-damaged", bad_run_config),
    ("report-no-evaluation", bad_missing_evaluation),
    ("endpoints-json-damaged", bad_endpoints_json),
    ("teardown-json-damaged", bad_teardown_json),
    ("plan-schema-unusable", bad_plan_schema),
    ("journal-garbage-lines", lambda sb: _completed(sb, "garbage", _garbage_lines)),
    ("sent-log-garbage", lambda sb: _completed(sb, "sentlog", _garbage_sent)),
    ("parquet-damaged", bad_parquet),
    ("config-yaml-a-directory", bad_config_dir),
]
