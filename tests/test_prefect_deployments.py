"""prefect.yaml against a real `prefect server start`: register every deployment, trigger the
evaluate deployment with parameters through the API (as the UI does), run it with a process
worker, and read the finished run's artifacts back through the Prefect client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from synthetic_run import make_finished_run

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {"experiment", "deploy", "observe", "ab", "evaluate", "decide-teardown", "reaper", "canary"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true", "GUIDED_AB_HOME": str(REPO),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 180 s")
        yield env
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def cli(env, *args, timeout=300):
    r = subprocess.run([*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_deployments_register_and_evaluate_runs_from_the_api(prefect_server, tmp_path):
    env = prefect_server
    cli(env, "work-pool", "create", "guided-ab", "--type", "process")
    cli(env, "--no-prompt", "deploy", "--all")
    store = make_finished_run(tmp_path / "runs", "api-run", decide=False)

    async def trigger_and_read():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            names = {d.name for d in await client.read_deployments()}
            assert DEPLOYMENTS <= names, names
            dep = await client.read_deployment_by_name("evaluate/evaluate")
            run = await client.create_flow_run_from_deployment(
                dep.id, parameters={"run_id": "api-run", "store": str(store.root), "thresholds": {"success_margin": 0.02}},
            )
            return run.id

    # the API client talks to this module's server (also when a session-wide test harness is active)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow_run_id = asyncio.run(trigger_and_read())
        cli(env, "worker", "start", "--pool", "guided-ab", "--run-once", timeout=420)

        async def wait_and_artifacts():
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            async with get_client() as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    fr = await client.read_flow_run(flow_run_id)
                    if fr.state and fr.state.is_final():
                        break
                    await asyncio.sleep(2)
                arts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
                return fr, arts

        fr, arts = asyncio.run(wait_and_artifacts())
    assert fr.state.is_completed(), fr.state
    keys = {a.key for a in arts}
    assert {"synthetic-report", "synthetic-arms", "synthetic-criteria"} <= keys, keys
    report = next(a for a in arts if a.key == "synthetic-report")
    assert "Criteria" in report.data
    decision = store.read_json("decision.json")
    assert decision["overridden"] == {"success_margin": 0.02}
    assert decision["thresholds"]["success_margin"] == 0.02
