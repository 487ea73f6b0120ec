"""Reliability 2 (issue 17), items 1-7: each test reproduces what broke in a hostile afternoon.

1. teardown and reap stop only what this run started (a stored pid may now name anything);
2. `$ref`s are resolved when the workload loads, and a validator's exception is an outcome class;
3. one writer per phase of a run;
4. what a server sent is text, never markup (CLI, report.md, report.html);
5. Ctrl-C ends in bounded time with records kept, teardown written, exit 130 (test_ctrl_c.py);
6. a slow regex in validation stalls nothing else and is its own class;
7. a server that echoes the API key never gets it written.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guided_ab import phases
from guided_ab.arms import identity, local
from guided_ab.arms.base import Endpoint
from guided_ab.arms.vllm_args import SERVER_MODULE
from guided_ab.config import ConfigError, parse_config
from guided_ab.errors import UserError
from guided_ab.load.classify import classify
from guided_ab.load.client import RawResponse
from guided_ab.records import OUTCOMES
from guided_ab.selfcheck import harness
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore
from guided_ab.workload import check_schema

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    key = "gab-test-" + secrets.token_urlsafe(18)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    yield sb
    assert sc.leaked_files(sb.root, [key]) == [], "the API key was written by the run"


# -- 1. stop only what this run started -------------------------------------------------------------
def _sleeper(*argv: str, env: dict | None = None) -> subprocess.Popen:
    """An unrelated process in its own session (what a reused pid may name)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv], start_new_session=True,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _local_run(tmp_path: Path) -> tuple:
    cfg = parse_config({"name": "own", "store": str(tmp_path / "runs"), "arms": [
        {"name": "a", "role": "control", "backend": "guidance"}, {"name": "b", "role": "candidate", "backend": "auto"}]})
    return cfg, RunStore.create(cfg, f"own-{secrets.token_hex(3)}")


def test_teardown_never_signals_a_process_the_run_did_not_start(tmp_path):
    cfg, store = _local_run(tmp_path)
    # an unrelated process (a record from before markers, of a server started a minute ago), and one
    # that even looks like a vLLM server on the arm's port, started when the record says (another run's)
    strangers = [_sleeper(), _sleeper(SERVER_MODULE, "--port", "18123")]
    try:
        phases.save_endpoints(store, {arm.name: Endpoint(
            run_id=store.run_id, arm=arm.name, target="local", base_url="http://127.0.0.1:18123", model="m",
            backend=arm.backend, pid=p.pid, port=18123, **fields)
            for arm, p, fields in zip(cfg.arms, strangers, [{"started_at": time.time() - 60},
                                                             {"started_at": time.time(), "marker": f"{store.run_id}/b/x"}])})
        entries = phases.teardown(store, log=lambda m: None)
        time.sleep(0.3)
        assert [p.poll() for p in strangers] == [None, None], "teardown signalled a process this run did not start"
        assert not any(e["stopped"] for e in entries)
        assert store.has("teardown.json")
    finally:
        for p in strangers:
            p.kill()
            p.wait()


def test_reap_never_signals_a_process_its_record_does_not_describe(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDED_AB_STATE_DIR", str(tmp_path / "state"))
    stranger = _sleeper(SERVER_MODULE, "--port", "18124")
    try:
        record = {"run_id": "old-run", "arm": "a", "pid": stranger.pid, "pgid": stranger.pid, "port": 18124,
                  "started_at": time.time() - 3600, "log": "", "owner_pid": 0, "owner_cmd": ""}
        (local._servers_dir() / "old-run--a.json").write_text(json.dumps(record))
        assert local.reap() == []
        time.sleep(0.3)
        assert stranger.poll() is None, "reap signalled a process its record does not describe"
    finally:
        stranger.kill()
        stranger.wait()


def test_teardown_still_stops_the_servers_this_run_started(tmp_path, monkeypatch):
    """A stand-in vLLM (the server module on PYTHONPATH sleeps) started by local.start is stopped, group and all."""
    fake = tmp_path / "fake"
    pkg = fake / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (fake / "vllm", fake / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text("import subprocess, sys, time\n"
                                       "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                                       "time.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("GUIDED_AB_STATE_DIR", str(tmp_path / "state"))
    cfg, store = _local_run(tmp_path)
    ep = local.start(cfg.arms[0], store, python=sys.executable, model="m", version="0")
    phases.save_endpoints(store, {"a": ep})
    assert ep.pid is not None
    time.sleep(0.5)
    entries = phases.teardown(store, log=lambda m: None)
    assert entries[0]["stopped"] is True
    assert not local._alive(ep.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(ep.pid, 0)  # the worker it started is gone too
    assert not [r for r in local.leftovers() if r["run_id"] == store.run_id]


def test_a_group_whose_leader_died_is_still_proved_by_its_workers_marker(tmp_path, monkeypatch):
    import signal

    fake = tmp_path / "fake"
    pkg = fake / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (fake / "vllm", fake / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text("import subprocess, sys, time\n"
                                       "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                                       "time.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("GUIDED_AB_STATE_DIR", str(tmp_path / "state"))
    cfg, store = _local_run(tmp_path)
    ep = local.start(cfg.arms[1], store, python=sys.executable, model="m", version="0")
    assert ep.pid is not None
    deadline = time.monotonic() + 10
    while len(identity.group_members(ep.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(ep.pid, signal.SIGKILL)  # the leader dies (a zombie until reaped); its worker lives on
    phases.save_endpoints(store, {"b": ep})
    assert phases.teardown(store, log=lambda m: None)[0]["stopped"] is True
    deadline = time.monotonic() + 10
    while identity.group_members(ep.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert identity.group_members(ep.pid) == []


# -- 2. $refs resolved when the workload loads -------------------------------------------------------
@pytest.mark.parametrize("schema, needle", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "#/$defs/nope"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/other.json"}}}, "remote"),
    ({"$ref": "other.json#/a"}, "remote"),
    ({"$ref": "#"}, "loop"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "loop"),
])
def test_unresolvable_remote_and_looping_refs_are_config_errors(schema, needle):
    with pytest.raises(ConfigError) as err:
        check_schema(schema, "suite/s1", 10**6)
    assert "suite/s1" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}},  # a tree: recursion through items
    {"$id": "https://example.com/s.json", "$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"},  # local under a remote $id
    {"$defs": {"a/b": {"type": "integer"}}, "properties": {"x": {"$ref": "#/$defs/a~1b"}}},
])
def test_resolvable_refs_are_accepted(schema):
    assert check_schema(schema, "s", 10**6) == schema


def test_an_exception_of_the_validator_is_an_outcome_class_not_a_crash():
    raw = RawResponse(sent_at=0.0, http_status=200, text='{"a": 1}', finish_reason="stop")
    outcome, error = classify(raw, {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})
    assert outcome in OUTCOMES and outcome == "validation_error"
    assert error and "nope" in error


# -- 3. one writer per phase -----------------------------------------------------------------------
def test_two_writers_of_one_phase_the_second_is_refused_naming_the_holder(sandbox):
    with FaultServer("healthy", api_key=sandbox.key, delay_s=0.2) as srv:
        cfg = sandbox.config("lock", srv.url, srv.url, size=6, concurrency=2, timeout_s=5.0)
        store = RunStore.create(cfg, f"lock-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sandbox.log)
        plan = phases.build_plans(cfg, store)["ab"]
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def writer() -> None:
            start.wait()
            try:
                phases.run_requests(cfg, RunStore.open(sandbox.store, store.run_id), "ab")
            except BaseException as err:  # noqa: BLE001 - the test inspects it
                errors.append(err)

        threads = [threading.Thread(target=writer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        phases.teardown(store, log=sandbox.log)
    acc = harness.account(store, plan)
    assert acc.duplicates == 0 and acc.lost == 0 and acc.recorded == acc.planned, acc
    assert len(errors) == 1 and isinstance(errors[0], UserError), errors
    msg = str(errors[0])
    assert f"pid {os.getpid()}" in msg and "ab" in msg and store.run_id in msg


# -- 4. server text is text, never markup ------------------------------------------------------------
HOSTILE_BACKEND = "[/bold][link=javascript:alert(1)]x[/link] $\\frac{1}{ <b>*bold*</b> | `tick`"


def test_a_hostile_backend_header_is_printed_as_text_everywhere(tmp_path):
    from synthetic_run import make_finished_run
    from typer.testing import CliRunner

    from guided_ab.cli import app

    store = make_finished_run(tmp_path / "runs", "markup-run", pairs=30, decide=False)
    p = store.journal_path("ab")
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    for r in rows:
        if r["arm"] == "auto":
            r["backend"] = HOSTILE_BACKEND
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.finalize_records("ab")
    runner = CliRunner()
    for args in (["evaluate", "--run-id", "markup-run", "--store", str(tmp_path / "runs")],
                 ["report", "markup-run", "--store", str(tmp_path / "runs")],
                 ["runs", "--store", str(tmp_path / "runs")]):
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 0, (args, result.output, result.exception)
    result = runner.invoke(app, ["evaluate", "--run-id", "markup-run", "--store", str(tmp_path / "runs")], env={"COLUMNS": "400"})
    assert "decision=" in result.output.splitlines()[-1]
    assert "[/bold][link=javascript:alert(1)]x[/link]" in result.output  # shown as the text it is
    md = store.path("report.md").read_text()
    assert "[/bold][link=" not in md and "<b>" not in md  # escaped for markdown
    html = store.path("report.html").read_text()
    assert "<b>*bold*</b>" not in html and "javascript:alert(1)]x" in html.replace("&#x27;", "'")


# -- 6. a slow regex stalls nothing else ---------------------------------------------------------------
# `^(a+)+$` is the issue's pattern (Python's re backtracks for minutes on 28 "a"s and a "!");
# `^(a|a)+$` backtracks in every engine that backtracks: only the time bound ends it
EVIL = {"type": "string", "pattern": "^(a|a)+$"}


@pytest.mark.parametrize("pattern, expected", [("^(a+)+$", "schema_violation"), ("^(a|a)+$", "validation_timeout")])
def test_a_slow_regex_is_bounded_off_the_event_loop_and_its_own_class(sandbox, pattern, expected):
    suite = sandbox.write_suite("evil", {"evil": {"type": "string", "pattern": pattern}})
    with FaultServer("healthy", api_key=sandbox.key) as control, \
            FaultServer("evil_regex", api_key=sandbox.key, evil_length=26) as cand:
        t0 = time.monotonic()
        run = harness.run_phase(sandbox, "evil", control.url, cand.url, suite=suite, size=1, repeats=4, warmup=0,
                                   timeout_s=3.0, concurrency=4, stream_share=0.5, validation_timeout_s=1.0)
        took = time.monotonic() - t0
    recs = run.store.journal("ab")
    assert run.acc.lost == 0 and run.acc.duplicates == 0 and run.acc.recorded == run.acc.planned
    assert {r.outcome for r in recs if r.arm == "candidate"} == {expected}
    assert {r.outcome for r in recs if r.arm == "control"} == {"success"}
    # the loop was never stalled: no control request reached its 3 s timeout (a stalled loop made
    # a healthy request a `timeout` before); the bounds are loose so a busy CI machine passes
    assert max(r.latency_s or 0 for r in recs if r.arm == "control") < 2.5
    assert took < 45  # a stalled loop made this phase take ~100 s


# -- 7. a server that echoes the key -------------------------------------------------------------------
def test_a_server_echoing_the_api_key_never_gets_it_written(sandbox):
    with FaultServer("healthy", api_key=sandbox.key) as control, FaultServer("echo", api_key=sandbox.key) as cand:
        run = harness.run_phase(sandbox, "echo", control.url, cand.url, stream_share=0.5)
    phases.decide_run(run.store)
    recs = run.store.journal("ab")
    echoed = [r for r in recs if r.arm == "candidate"]
    assert {r.outcome for r in echoed} <= {"rejected", "invalid_request", "schema_violation"} and echoed
    assert all("Bearer" in ((r.error or "") + (r.output or "")) for r in echoed)  # the echo is there, the key is not
    assert sc.leaked_files(run.store.dir, [sandbox.key]) == []


def test_classify_runs_validation_off_the_loop():
    """The async classification used by the runner keeps the loop free while a regex backtracks."""
    from guided_ab.load.classify import classify_async

    raw = RawResponse(sent_at=0.0, http_status=200, text=json.dumps("a" * 32 + "!"), finish_reason="stop")

    async def main() -> tuple[str, float]:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        t = asyncio.create_task(ticker())
        outcome, _ = await classify_async(raw, EVIL, timeout_s=0.5)
        t.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        return outcome, max(gaps or [0.0])

    outcome, worst_gap = asyncio.run(main())
    assert outcome == "validation_timeout"
    assert worst_gap < 0.3


def test_validation_still_runs_in_a_forked_child():
    """A phase process forked from one that validated before (the selfcheck's phase children) must
    not inherit a thread pool whose threads did not come along."""
    from guided_ab.load.classify import classify_async

    raw = RawResponse(sent_at=0.0, http_status=200, text='"a"', finish_reason="stop")
    assert asyncio.run(classify_async(raw, {"type": "string"}))[0] == "success"  # the pool exists now
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = 0 if asyncio.run(classify_async(raw, {"type": "string"}, timeout_s=2.0))[0] == "success" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
