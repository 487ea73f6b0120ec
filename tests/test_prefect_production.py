"""Production on a real `prefect server start` (its own PREFECT_HOME and port, SQLite), one server
for the whole module:

- `prefect deploy --all` from a fresh clone of the repository (origin: a bare repository in the
  test's temporary directory), with no GUIDED_AB_* variable set: every deployment pulls the
  deployed commit with `git_clone` and installs requirements.txt (pip finds everything installed:
  PIP_NO_INDEX=1 proves it never needs an index);
- a process worker, started in an empty directory, runs the evaluate deployment from that clone;
- a `switch` under `decision.require_approval` pauses with a form; resumed through the API with
  "reject", decision.json records the rejection and the published verdict is `keep`;
- two experiments with local arms (fake vLLM servers: tests/fake_vllm.py) on one machine whose
  global concurrency limit has 2 slots: the second waits until the first has torn down;
- that second experiment, SIGKILL'd in the middle of its A/B, is torn down by the automation
  (teardown-crashed), retried through the API as the UI's "Retry" does, and resumes the same
  run: same run id, one record per planned request.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import yaml
from fake_vllm import wrapper as fake_vllm_python
from synthetic_run import make_finished_run

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {"experiment", "deploy", "observe", "ab", "evaluate", "decide-teardown", "continue", "reaper",
               "teardown-crashed", "canary", "promote", "monitor", "revert"}
MACHINE = "test-machine"

pytestmark = pytest.mark.timeout(1500)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def base_env() -> dict[str, str]:
    """This environment without any guided-ab variable or PYTHONPATH (what a fresh shell has)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GUIDED_AB_", "PREFECT_")) and k != "PYTHONPATH"}


# -- the module's server, clone, deployments and worker ---------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 180 s")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """A clone of a bare repository holding this working tree as one commit (what a team member
    gets with `git clone`); its origin is the bare repository's path."""
    tmp = tmp_path_factory.mktemp("git")
    git("clone", "-q", str(bare_origin(tmp)), str(tmp / "fresh"), cwd=tmp)
    return tmp / "fresh"


def bare_origin(tmp: Path) -> Path:
    """A bare repository holding this working tree (tracked and untracked, not ignored files) as one commit."""
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    git("init", "-q", cwd=src)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "the working tree", cwd=src)
    git("clone", "-q", "--bare", str(src), str(tmp / "origin.git"), cwd=tmp)
    return tmp / "origin.git"


def cli(env, *args, cwd, timeout=300):
    r = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def deployed(server, fresh_clone):
    t0 = time.monotonic()
    cli(server, "work-pool", "create", "guided-ab", "--type", "process", cwd=fresh_clone)
    # the per-machine limit as prefect.yaml's comment creates it: one 2-arm experiment at a time
    cli(server, "global-concurrency-limit", "create", f"guided-ab-local-{MACHINE}", "--limit", "2", cwd=fresh_clone)
    out = cli(server, "--no-prompt", "deploy", "--all", cwd=fresh_clone, timeout=600)
    print(f"deploy --all from the fresh clone: {time.monotonic() - t0:.0f} s")
    return {"output": out, "commit": git("rev-parse", "HEAD", cwd=fresh_clone),
            "origin": git("remote", "get-url", "origin", cwd=fresh_clone)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def worker(server, deployed, data_dir, tmp_path_factory):
    """A process worker in an empty directory: no checkout there, only what the pull steps fetch."""
    where = tmp_path_factory.mktemp("worker")
    env = {
        **server, "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "2",
        "GUIDED_AB_DATA": str(data_dir),  # run stores outlive the flow runs' temporary clones
        "GUIDED_AB_VLLM_PYTHON": fake_vllm_python(where), "FAKE_VLLM_DELAY_S": "0.3",
        "GUIDED_AB_STATE_DIR": os.environ["GUIDED_AB_STATE_DIR"], "GUIDED_AB_MACHINE": MACHINE,
        "GUIDED_AB_SLOT_LEASE_S": "60", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    log = open(where / "worker.log", "w")
    proc = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "guided-ab"], env=env, cwd=where,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield where / "worker.log"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    from guided_ab.arms import local

    local.reap(force=True)  # whatever fake server a failed test left


# -- API helpers ---------------------------------------------------------------------------------
def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run_deployment(name: str, parameters: dict) -> UUID:
    with client() as c:
        dep = c.read_deployment_by_name(name)
        return c.create_flow_run_from_deployment(dep.id, parameters=parameters).id


def wait_state(flow_run_id: UUID, ok, timeout: float = 300, what: str = "state"):
    deadline = time.monotonic() + timeout
    with client() as c:
        while time.monotonic() < deadline:
            fr = c.read_flow_run(flow_run_id)
            if fr.state and ok(fr.state):
                return fr
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not reach the {what} in {timeout} s: {fr.state}")


def logs_of(flow_run_id: UUID) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client() as c:
        return "\n".join(r.message for r in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def artifacts_of(flow_run_id: UUID):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


# -- 1. deploy from a fresh clone ----------------------------------------------------------------
def test_deploy_all_from_a_fresh_clone_pulls_the_deployed_commit(server, deployed):
    with client() as c:
        deps = {d.name: d for d in c.read_deployments()}
        automations = c.read_automations()
    assert DEPLOYMENTS <= set(deps), sorted(deps)
    pull = deps["evaluate"].pull_steps
    clone = pull[0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == deployed["origin"] and clone["commit_sha"] == deployed["commit"]
    assert pull[1]["prefect.deployments.steps.pip_install_requirements"]["requirements_file"] == "requirements.txt"
    assert deps["reaper"].parameters == {"older_than_s": 3600, "modal_prefix": "gab-"}
    trigger = next(a for a in automations if "teardown-crashed" in a.name).trigger
    related = trigger.match_related[0] if isinstance(trigger.match_related, list) else trigger.match_related
    assert "prefect.flow-run.Crashed" in trigger.expect and dict(related.root) == {
        "prefect.resource.role": "flow", "prefect.resource.name": "experiment"}


def test_requirements_txt_matches_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    want = [*project["dependencies"], *project["optional-dependencies"]["modal"]]
    lines = [ln for ln in (REPO / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == want


# -- 2. a worker runs the evaluate deployment from the clone -------------------------------------
def test_worker_runs_the_evaluate_deployment_from_its_clone(worker, data_dir):
    store = make_finished_run(data_dir / "synthetic", "api-run", decide=False)
    fr_id = run_deployment("evaluate/evaluate", {"run_id": "api-run", "store": str(store.root),
                                                 "thresholds": {"success_margin": 0.02}})
    fr = wait_state(fr_id, lambda s: s.is_final(), what="end")
    assert fr.state.is_completed(), (fr.state, worker.read_text()[-3000:])
    logs = logs_of(fr_id)
    assert "Deployment step 'git_clone' completed successfully" in logs, logs[-2000:]
    assert "Deployment step 'pip_install_requirements' completed successfully" in logs
    keys = {a.key for a in artifacts_of(fr_id)}
    assert {"synthetic-report", "synthetic-arms", "synthetic-criteria"} <= keys, keys
    decision = store.read_json("decision.json")
    assert decision["overridden"] == {"success_margin": 0.02} and "approval" not in decision


# -- 3. a human sign-off before a switch ---------------------------------------------------------
def _resume(flow_run_id: UUID, run_input: dict) -> None:
    """Resume a paused flow run with input as the UI's form does. Prefect 3.9 marks the run Paused
    before it saves the form's schema; resuming in between is refused ("Run input schema not found",
    seen once on a loaded CI machine), so try again for a while, as a person clicking again would."""
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + 60
    while True:
        try:
            return resume_flow_run(flow_run_id, run_input=run_input)
        except RuntimeError as err:
            if "schema not found" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_switch_waits_for_sign_off_and_a_rejection_publishes_keep(worker, data_dir):
    store = make_finished_run(data_dir / "synthetic", "approval-run", ratio=0.6, decide=False)
    cfg = store.load_config()
    store.save_config(cfg.model_copy(update={"decision": cfg.decision.model_copy(update={"require_approval": True})}))
    # generous guardrails make this synthetic run (candidate 40 % faster) a clear switch
    fr_id = run_deployment("evaluate/evaluate", {"run_id": "approval-run", "store": str(store.root),
                                                 "thresholds": {"success_margin": 0.3, "max_cv_ratio": 50}})
    wait_state(fr_id, lambda s: s.is_paused() or s.is_final(), what="pause")
    pending = store.read_json("decision.json")
    assert pending["verdict"] == "awaiting-approval" and pending["approval"]["proposed"] == "switch", pending
    assert "awaiting-approval" in store.path("report.md").read_text()
    _resume(fr_id, {"decision": "reject", "reason": "p99 regressed in the canary", "reviewer": "oncall"})
    fr = wait_state(fr_id, lambda s: s.is_final(), what="end")
    assert fr.state.is_completed(), fr.state
    decision = store.read_json("decision.json")
    assert decision["verdict"] == "keep" and decision["serve"] == "guidance"
    assert decision["approval"]["status"] == "rejected" and decision["approval"]["reason"] == "p99 regressed in the canary"
    assert decision["approval"]["reviewer"] == "oncall" and any("rejected" in r for r in decision["reasons"])
    report = next(a for a in artifacts_of(fr_id) if a.key == "synthetic-report")
    assert "KEEP" in report.data.upper() and "awaiting" not in report.data


# -- 4 and 5. local experiments one at a time; a crashed one resumes -----------------------------
def _config(path: Path, name: str, size: int, delay_s: float) -> str:
    arm = {"target": "local", "model": "fake/tiny-model", "server_args": ["--fake-delay-s", str(delay_s)]}
    path.write_text(yaml.safe_dump({
        "name": name, "store": "runs", "server_start_timeout_s": 60,
        "arms": [{"name": "guidance", "role": "control", "backend": "guidance", **arm},
                 {"name": "auto", "role": "candidate", "backend": "auto", **arm}],
        "workload": {"size": size, "observe_size": 2, "warmup": 1, "concurrency": 2, "timeout_s": 30, "max_tokens": 64},
        "decision": {"bootstrap_resamples": 200},
    }))
    return str(path)


def _run_dir(data_dir: Path, name: str) -> Path:
    dirs = sorted((data_dir / "runs").glob(f"{name}-*")) if (data_dir / "runs").is_dir() else []
    assert len(dirs) <= 1, f"one run per experiment flow run, got {dirs}"
    return dirs[0] if dirs else Path("/nonexistent")


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def two_experiments(worker, data_dir, tmp_path_factory):
    """The first experiment holds the machine's slots (its servers are up) when the second is
    triggered. Both have A/Bs of ~30 s (61 requests of 1 s, 2 at a time): the second arrives
    while the first still sends, and has time enough to be crashed half-way."""
    cfgs = tmp_path_factory.mktemp("configs")
    first = run_deployment("experiment/experiment", {"config_path": _config(cfgs / "a.yaml", "prod-a", 30, 1.0)})
    _wait_for(lambda: (_run_dir(data_dir, "prod-a") / "endpoints.json").is_file(), 300, "the first experiment to deploy")
    second = run_deployment("experiment/experiment", {"config_path": _config(cfgs / "b.yaml", "prod-b", 30, 1.0)})
    return first, second


def test_a_second_local_experiment_waits_for_the_first(two_experiments, data_dir, worker):
    import json

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    first, second = two_experiments
    fr = wait_state(first, lambda s: s.is_final(), what="end")
    assert fr.state.is_completed(), (fr.state, worker.read_text()[-3000:])
    a = _run_dir(data_dir, "prod-a")
    assert fr.name == a.name, "the experiment flow run is named after its run"
    b = _wait_for(lambda: (_run_dir(data_dir, "prod-b") / "endpoints.json").is_file() and _run_dir(data_dir, "prod-b"),
                  240, "the second experiment to deploy")
    a_stopped = min(e["stopped_at"] for e in json.loads((a / "teardown.json").read_text())["arms"])
    b_started = min(e["started_at"] for e in json.loads((b / "endpoints.json").read_text()).values())
    assert b_started >= a_stopped, "the second experiment started its servers before the first had torn down"

    def slot_logs():
        with client() as c:
            logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[second])))
        asked = [r.timestamp.timestamp() for r in logs if "global concurrency limit 'guided-ab-local-test-machine'" in r.message]
        got = [r.timestamp.timestamp() for r in logs if "got 2 slot(s) of 'guided-ab-local-test-machine'" in r.message]
        return (asked, got) if asked and got else None

    asked, got = _wait_for(slot_logs, 60, "the second experiment's slot logs")
    assert asked[0] < a_stopped <= got[0], "the second experiment did not wait for the first one's slots"


def test_a_crashed_experiment_retried_through_the_api_resumes_the_same_run(two_experiments, data_dir, worker):
    import json

    from prefect.states import AwaitingRetry

    from guided_ab.arms import local
    from guided_ab.plan import Plan
    from guided_ab.store import RunStore

    _, second = two_experiments
    b = _wait_for(lambda: _run_dir(data_dir, "prod-b").is_dir() and _run_dir(data_dir, "prod-b"), 240, "the run dir")
    journal = b / "records" / "ab.jsonl"
    _wait_for(lambda: journal.is_file() and len(journal.read_text().splitlines()) >= 8, 240, "A/B records")
    owner = next(r["owner_pid"] for r in local.leftovers() if r["run_id"] == b.name)
    os.kill(owner, signal.SIGKILL)  # the flow run's process, in the middle of its A/B
    wait_state(second, lambda s: s.is_crashed(), timeout=120, what="Crashed state")
    before = len(journal.read_text().splitlines())

    # the automation ran the teardown-crashed deployment for it
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    def teardown_run():
        with client() as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["teardown-crashed"])),
                                    flow_run_filter=FlowRunFilter())
        return next((r for r in runs if str(second) in str(r.parameters.get("flow_run_id")) and r.state.is_final()), None)

    td = _wait_for(teardown_run, 240, "the teardown-crashed flow run")
    assert td.state.is_completed(), td.state
    assert not [r for r in local.leftovers() if r["run_id"] == b.name and r["alive"]], "the crashed run's servers still run"

    # Prefect 3.9 reports a SIGKILL twice: the runner proposes Crashed and runs the on_crashed
    # hooks, then the worker proposes Crashed again and logs the exit code's resolution. A Retry
    # set between the two is overwritten by the second Crashed (seen once on a loaded CI machine),
    # so retry as an operator would: once the worker's report is in the run's logs.
    deadline = time.monotonic() + 120
    while "Check whether the flow run exceeded its memory" not in logs_of(second) and time.monotonic() < deadline:
        time.sleep(1)
    with client() as c:  # what the UI's "Retry" does
        c.set_flow_run_state(second, AwaitingRetry(message="Retry from the test"), force=True)
    fr = wait_state(second, lambda s: s.is_final() and s.name != "AwaitingRetry", timeout=420, what="end of the retry")
    assert fr.state.is_completed(), (fr.state, logs_of(second)[-3000:])
    assert _run_dir(data_dir, "prod-b") == b and fr.name == b.name, "the retry resumed the same run"
    assert "resuming" in logs_of(second)
    store = RunStore.open(b.parent, b.name)
    for phase in ("observe", "ab"):
        planned = sorted(r.request_id for r in Plan.model_validate(store.read_json(f"plan-{phase}.json")).requests)
        recorded = sorted(store.records((phase,))["request_id"])
        assert recorded == planned, f"{phase}: one record per planned request"
    assert len(journal.read_text().splitlines()) == len(Plan.model_validate(store.read_json("plan-ab.json")).requests) > before
    down = json.loads((b / "teardown.json").read_text())
    assert down.get("earlier"), "the arms the crash teardown stopped still count in the cost"
    assert store.read_json("decision.json")["verdict"] in ("keep", "switch", "inconclusive", "invalid")
