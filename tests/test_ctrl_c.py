"""Reliability 2 (issue 17), item 5: Ctrl-C ends a run in bounded time, even when the terminal's
SIGINT also killed Prefect's temporary API server (it is in the same process group): records kept,
teardown done and written, exit status 130, and the phase resumes exactly afterwards.

Slow (a real `guided-ab run`, whose temporary Prefect server takes 20-70 s to start on 2 cores).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from guided_ab import phases
from guided_ab.selfcheck import harness
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.fault_server import spawn
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
GUIDED_AB = REPO / ".venv" / "bin" / "guided-ab"


@pytest.mark.timeout(600)
def test_a_second_writer_of_a_phase_exits_2_naming_the_holder(tmp_path):
    """Item 3 through the CLI and Prefect: `guided-ab ab` on a run whose A/B phase another process
    is sending exits 2, names the holder, and sends nothing."""
    key = "gab-test-" + secrets.token_urlsafe(18)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    os.environ[sc.KEY_ENV] = key
    try:
        with spawn("healthy", api_key=key) as srv:
            cfg = sb.config("locked", srv.url, srv.url, size=2)
            store = RunStore.create(cfg, f"locked-{secrets.token_hex(3)}")
            phases.start_endpoints(cfg, store, log=lambda m: None)
            phases.build_plans(cfg, store)
            env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
            with store.phase_lock("ab"):  # this test process is the holder
                out = subprocess.run([str(GUIDED_AB), "ab", "--run-id", store.run_id, "--store", str(sb.store)],
                                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    finally:
        os.environ.pop(sc.KEY_ENV, None)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text[-3000:]
    assert f"is being sent by pid {os.getpid()}" in text and store.run_id in text
    assert store.journal("ab") == [] and store.sent_counts("ab") == {}


@pytest.mark.timeout(600)
def test_ctrl_c_to_the_process_group_ends_the_run_in_bounded_time(tmp_path):
    key = "gab-test-" + secrets.token_urlsafe(18)
    run_id = f"ctrlc-{secrets.token_hex(3)}"
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    with spawn("healthy", api_key=key, delay_s=0.5) as srv:
        data = sb.config_data("ctrlc", srv.url, srv.url, size=6, repeats=6, concurrency=1, timeout_s=5.0, warmup=0)
        cfg_path = tmp_path / "ctrlc.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        env = {**os.environ, sc.KEY_ENV: key, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        with open(tmp_path / "out.log", "wb") as out:
            proc = subprocess.Popen([str(GUIDED_AB), "run", str(cfg_path), "--run-id", run_id], cwd=tmp_path, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # its own group: SIGINT it as a terminal would
        journal = sb.store / run_id / "records" / "ab.jsonl"
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and proc.poll() is None:
                if journal.is_file() and len(journal.read_text().splitlines()) >= 4:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGINT)  # the CLI and Prefect's temporary server alike
            t0 = time.monotonic()
            try:
                rc = proc.wait(90)
            except subprocess.TimeoutExpired:
                rc = None
            ended_after = time.monotonic() - t0
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        output = (tmp_path / "out.log").read_text()
        assert rc == 130, f"rc {rc} after {ended_after:.0f} s:\n{output[-3000:]}"
        store = RunStore.open(sb.store, run_id)
        assert store.has("teardown.json"), output[-3000:]
        recorded = store.journal("ab")
        parquet = store.finalized_records("ab")
        assert parquet is not None and len(parquet) == len(recorded) >= 4
        assert f"guided-ab ab --run-id {run_id}" in output  # says how to resume
        # the resume is exact: every planned request recorded once
        os.environ[sc.KEY_ENV] = key
        try:
            cfg = store.load_config()
            phases.run_requests(cfg, store, "ab")
        finally:
            os.environ.pop(sc.KEY_ENV, None)
    acc = harness.account(store, phases.build_plans(cfg, store)["ab"])
    assert acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned
    # nothing it wrote holds the key: the run, its logs, Prefect's database and result storage
    from guided_ab.selfcheck.leaks import leaked_files, prefect_dirs

    assert [hit for d in [sb.root, *prefect_dirs()] for hit in leaked_files(d, [key])] == []
