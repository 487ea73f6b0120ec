"""SIGKILL the flow process during A/B, re-run the phase by run id: exactly one record per
planned request (issue: resume). Arms are external endpoints on a loopback fault server in
healthy mode, so the test needs no vLLM; the A/B phase runs as the real Prefect flow through
the CLI, in its own process, with its own ephemeral Prefect API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sigkill_mid_phase import sigkill_once_recorded

from guided_ab import phases
from guided_ab.config import parse_config
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-resume-0123456789"


def test_kill_flow_process_mid_ab_then_resume_exactly_once(tmp_path):
    server = FaultServer("healthy", api_key=KEY, delay_s=0.25)
    server.start()
    try:
        cfg = parse_config({
            "name": "resume", "store": str(tmp_path / "runs"), "phases": ["deploy", "ab"],
            "arms": [
                {"name": "control", "role": "control", "target": "external", "backend": "guidance", "url": server.url,
                 "api_key_env": "RESUME_TEST_KEY", "model": "guided-ab-model"},
                {"name": "cand", "role": "candidate", "target": "external", "backend": "auto", "url": server.url,
                 "api_key_env": "RESUME_TEST_KEY", "model": "guided-ab-model"},
            ],
            "workload": {"size": 40, "observe_size": 0, "warmup": 1, "concurrency": 2, "timeout_s": 20},
        })
        store = RunStore.create(cfg, "resume-1")
        plan = phases.build_plans(cfg, store)["ab"]
        phases.start_endpoints(cfg, store, log=lambda m: None)
        env = {**os.environ, "RESUME_TEST_KEY": KEY, "PREFECT_HOME": str(tmp_path / "prefect")}
        cmd = [sys.executable, "-m", "guided_ab.cli", "ab", "--run-id", "resume-1", "--store", str(tmp_path / "runs")]

        killed_at = sigkill_once_recorded(cmd, env, store, "ab", at_least=8)  # the flow process and its Prefect server
        assert 8 <= killed_at < len(plan.requests)

        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    finally:
        server.stop()

    records = store.journal("ab")
    ids = [r.request_id for r in records]
    assert Counter(ids).most_common(1)[0][1] == 1, "a request was recorded twice"
    assert sorted(ids) == sorted(r.request_id for r in plan.requests), "every planned request has its one record"
    # answered normally (the fault server's filler may miss a pattern: schema_violation is fine here)
    bad = Counter((r.outcome, r.error) for r in records if r.outcome not in ("success", "schema_violation"))
    assert not bad, bad
    sent = store.sent_counts("ab")
    # requests in flight at the kill were sent twice and recorded once, as attempt 2
    for r in records:
        assert r.attempt == sent[r.request_id]
    # the finished phase's parquet holds the same records
    assert len(store.records(("ab",))) == len(plan.requests)
