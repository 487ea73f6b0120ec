"""Phases on Prefect workers anywhere: what a run needs travels with its store, nothing else.

- `distributed` (run alone with `pytest -m distributed`): a whole experiment with external arms
  (two loopback FaultServers) whose deploy, A/B and evaluate phases run on three Prefect process
  workers, each started in its own empty directory with its own PREFECT_HOME and state directory
  and pinned to its phase by its own work pool. They share the Prefect server and the run store,
  nothing else: the code comes from a `git_clone` pull step into each flow run's temporary
  directory, the key from each worker's environment. One record per planned request, the report
  in the store, each flow run executed by its own worker (its `prefect.worker.name` label and work
  pool in the API), and every worker's directory still empty afterwards.
- offline: per-run keys of Modal arms (a modal.Secret named like the run's app, through a fake
  of the thin Modal-SDK layer), found from the run id on another machine, never in the store,
  deleted with the app; local arms stay on the machine that started them: a phase for them
  elsewhere stops with "this run's arms are local to host X" (exit 2), nothing changed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from s3_server import s3_server  # noqa: F401 (the session's S3 API server: a fixture)
from test_modal_target import CONFIG as MODAL_CONFIG
from test_modal_target import FakeModal
from test_prefect_production import bare_origin, base_env

from guided_ab import phases
from guided_ab.arms import modal as modal_target
from guided_ab.arms import targets
from guided_ab.arms.base import Endpoint, resolve_key
from guided_ab.config import load_config, parse_config
from guided_ab.errors import RunStateError
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
KEY = "dist-test-key"
KEY_ENV = "GAB_DIST_TEST_KEY"
# phase -> (flow entrypoint, the work pool and the worker that alone may run it)
PHASES = {
    "deploy": "flows/deploy.py:deploy",
    "ab": "flows/ab.py:ab",
    "evaluate": "flows/evaluate.py:evaluate",
}


# -- the distributed experiment ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_store(s3_server):  # noqa: F811 (the imported fixture)
    """The run store the submitter and the three workers share, on S3 (moto's server), and what a
    process needs to reach it (endpoint and credentials: in the workers' environment)."""
    bucket = s3_server.new_bucket("dist")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(k, raising=False)
        yield {"url": f"s3://{bucket}/runs", "bucket": bucket, "env": s3_server.env(), "server": s3_server}


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _start_worker(phase: str, api_url: str, where: Path, home: Path, store_env: dict[str, str]) -> subprocess.Popen:
    env = {
        **base_env(), **store_env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the flow runs' logs stay in the worker's log (its stdout): three workers' log batches would
        # only add writes to the test server's SQLite on a loaded machine
        "PREFECT_LOGGING_TO_API_ENABLED": "false", "PREFECT_CLIENT_MAX_RETRIES": "10",
        "GUIDED_AB_STATE_DIR": str(home / "state"), "GUIDED_AB_MACHINE": f"box-{phase}", KEY_ENV: KEY,
    }
    log = open(home / "worker.log", "w")
    return subprocess.Popen([*PREFECT, "worker", "start", "--pool", f"gab-dist-{phase}", "--name", f"worker-{phase}",
                             "--type", "process"], env=env, cwd=where, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(prefect_harness, shared_store, tmp_path_factory):
    """Three process workers, one per phase, each in an empty directory; the phase deployments,
    each on its worker's pool, pulling the code with git_clone."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    from flows.ab import ab
    from flows.deploy import deploy
    from flows.evaluate import evaluate

    t0 = time.monotonic()
    api_url = PREFECT_API_URL.value()
    origin = bare_origin(tmp_path_factory.mktemp("git"))
    with _client() as c:
        for phase in PHASES:
            c.create_work_pool(WorkPoolCreate(name=f"gab-dist-{phase}", type="process",
                                              base_job_template=ProcessWorker.get_default_base_job_template()),
                               overwrite=True)
    workers, procs = {}, []
    try:
        for phase in PHASES:
            where, home = tmp_path_factory.mktemp(f"worker-{phase}"), tmp_path_factory.mktemp(f"home-{phase}")
            procs.append(_start_worker(phase, api_url, where, home, shared_store["env"]))
            workers[phase] = {"dir": where, "log": home / "worker.log", "proc": procs[-1]}
        # what `prefect deploy` registers for prefect.yaml's process pool, made through the API (a
        # `deploy --all` of every deployment takes minutes here): the entrypoint, a git_clone pull
        # step of the repository, the parameters' schema, the pool
        deployments, t_deploy = {}, time.monotonic()
        with _client() as c:
            for phase, phase_flow in {"deploy": deploy, "ab": ab, "evaluate": evaluate}.items():
                deployments[phase] = c.create_deployment(
                    flow_id=c.create_flow_from_name(phase_flow.name), name=f"dist-{phase}", entrypoint=PHASES[phase],
                    work_pool_name=f"gab-dist-{phase}", enforce_parameter_schema=True,
                    parameter_openapi_schema=parameter_schema(phase_flow).model_dump_for_openapi(),
                    pull_steps=[{"prefect.deployments.steps.git_clone": {"repository": str(origin)}}],
                )
        print(f"cluster ready in {time.monotonic() - t0:.0f} s (deployments {time.monotonic() - t_deploy:.0f} s)")
        yield {"workers": workers, "deployments": deployments, "origin": origin}
    finally:
        for proc in procs:
            _stop(proc)


def _run_phase(cluster: dict, phase: str, parameters: dict, timeout: float = 240):
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    # the test server's SQLite answers 503 ("database is locked") now and then on a loaded machine
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 10}), _client() as c:
        fr_id = c.create_flow_run_from_deployment(cluster["deployments"][phase], parameters=parameters).id
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fr = c.read_flow_run(fr_id)
            if fr.state and fr.state.is_final():
                break
            time.sleep(0.5)
    worker = cluster["workers"][phase]
    assert fr.state and fr.state.is_completed(), (phase, fr.state, worker["log"].read_text()[-4000:])
    return fr


def _experiment_config(store_url: str, control: str, candidate: str) -> dict:
    arm = {"target": "external", "api_key_env": KEY_ENV, "model": "guided-ab-model"}
    return {
        "name": "dist", "store": store_url, "phases": ["deploy", "ab", "evaluate", "decide"],
        "arms": [{"name": "control", "role": "control", "backend": "guidance", "url": control, **arm},
                 {"name": "cand", "role": "candidate", "backend": "auto", "url": candidate, **arm}],
        "workload": {"size": 12, "observe_size": 0, "warmup": 1, "concurrency": 4, "timeout_s": 20},
        "decision": {"bootstrap_resamples": 200},
    }


@pytest.mark.distributed
@pytest.mark.timeout(900)  # set-up included: a loaded 2-core machine took 150 s + 320 s
def test_deploy_ab_and_evaluate_each_run_on_their_own_worker(cluster, shared_store):
    t0 = time.monotonic()
    with FaultServer("healthy", api_key=KEY, delay_s=0.02) as control, FaultServer("healthy", api_key=KEY, delay_s=0.02) as cand:
        # the submitter pre-registers the run (config and plans) in the shared store; nothing else
        cfg = parse_config(_experiment_config(shared_store["url"], control.url, cand.url))
        store = RunStore.create(cfg, f"dist-{int(time.time())}")
        planned = phases.build_plans(cfg, store)["ab"]
        params = {"run_id": store.run_id, "store": shared_store["url"]}
        runs = {phase: _run_phase(cluster, phase, params) for phase in PHASES}
    took = time.monotonic() - t0
    for phase, fr in runs.items():  # where the time goes: a worker's pick-up, process start and clone, then the flow
        print(f"{phase}: started {(fr.start_time - fr.created).total_seconds():.1f} s after creation, "
              f"ran {(fr.end_time - fr.start_time).total_seconds():.1f} s")

    # each phase ran on its own worker: the worker that took it labelled it, from its own pool
    for phase, fr in runs.items():
        assert fr.work_pool_name == f"gab-dist-{phase}", (phase, fr.work_pool_name)
        assert fr.labels.get("prefect.worker.name") == f"worker-{phase}", (phase, fr.labels)
        assert str(fr.id) in cluster["workers"][phase]["log"].read_text()
    # the workers' directories hold nothing: the code was cloned into each flow run's temporary
    # directory, and the run lives only in the shared store
    for phase, w in cluster["workers"].items():
        assert list(w["dir"].iterdir()) == [], (phase, list(w["dir"].iterdir()))

    # one record per planned request, read back from the shared store
    store = RunStore.open(shared_store["url"], store.run_id)
    ids = [r.request_id for r in store.journal("ab")]
    assert ids and Counter(ids).most_common(1)[0][1] == 1, "a request was recorded twice"
    assert sorted(ids) == sorted(r.request_id for r in planned.requests), "every planned request has its one record"
    endpoints = store.read_json("endpoints.json")
    assert {ep["base_url"] for ep in endpoints.values()} == {control.url.removesuffix("/v1"), cand.url.removesuffix("/v1")}
    assert KEY not in json.dumps(endpoints)
    # the report, written by the evaluate worker into the store
    decision = store.read_json("decision.json")
    assert decision["verdict"] in {"keep", "switch", "inconclusive"}, decision
    gates = {g["name"]: g["passed"] for g in store.read_json("evaluation.json")["gates"]}
    assert all(gates.values()), gates
    assert store.has("report.md") and store.has("report.html") and store.run_id in store.read_text("report.md")
    listed = shared_store["server"].client().list_objects_v2(Bucket=shared_store["bucket"], Prefix=f"runs/{store.run_id}/")
    names = {o["Key"].removeprefix(f"runs/{store.run_id}/") for o in listed.get("Contents", [])}
    assert {"report.md", "report.html", "decision.json", "endpoints.json"} <= names, sorted(names)
    print(f"three phases on three workers: {took:.0f} s")


# -- per-run keys of Modal arms ----------------------------------------------------------------
@pytest.fixture()
def modal_run(tmp_path, monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "the-team-key")
    fake = FakeModal()
    cfg = load_config(MODAL_CONFIG).model_copy(update={"store": str(tmp_path / "runs")})
    with modal_target.use_sdk(fake):
        yield fake, RunStore.create(cfg, "auto-vs-guidance-20261130-120000-ab12")


def test_each_modal_arm_gets_its_own_key_in_a_secret_named_by_the_run(modal_run, monkeypatch):
    from modal_apps import vllm_arm

    fake, store = modal_run
    built = []
    real_build = vllm_arm.build_app
    monkeypatch.setattr(vllm_arm, "build_app", lambda spec: built.append(spec) or real_build(spec))
    cfg = store.load_config()
    eps = {name: targets.start_arm(cfg.arm(name), store) for name in ("guidance", "auto")}
    phases.save_endpoints(store, eps)

    keys = {}
    for name, ep in eps.items():
        secret = fake.secrets[ep.app_name]  # named like the arm's app, which names the run
        assert store.run_id.removeprefix("auto-vs-guidance-") in ep.app_name
        keys[name] = secret["VLLM_API_KEY"]
        assert resolve_key(ep.key_ref) == keys[name]  # what the requests send is what the container checks
    # each app mounts the team's secret (HF_TOKEN, ...) and then its run's, whose VLLM_API_KEY wins
    assert {spec.run_key_secret for spec in built} == {ep.app_name for ep in eps.values()}
    assert {spec.arm.modal.api_key_secret for spec in built} == {"guided-ab-api-key"}
    from modal._utils.async_utils import synchronizer

    for spec in built:
        function = synchronizer._translate_in(vllm_arm.build_arm_app(spec)[1])
        assert [s._rep for s in function._spec.secrets] == [
            "modal.Secret.from_name('guided-ab-api-key')", f"modal.Secret.from_name('{spec.app_name}')"]
    assert all(vllm_arm.ArmSpec.from_environment(spec.environment()).run_key_secret == spec.run_key_secret for spec in built)
    assert len(set(keys.values())) == 2 and "the-team-key" not in keys.values(), "a key per arm, never the team's"

    # no key, team or per-run, anywhere in the run store
    stored = "".join(p.read_text(errors="replace") for p in store.dir.rglob("*") if p.is_file())
    assert all(k not in stored for k in [*keys.values(), "the-team-key"])

    # a phase on another machine (another process, another state directory) finds the key from the run id
    child = subprocess.run(
        [sys.executable, "-c", "import json, sys; from guided_ab import phases; from guided_ab.store import RunStore; "
         "from guided_ab.arms.base import resolve_key; s = RunStore.open(sys.argv[1], sys.argv[2]); "
         "print(json.dumps({k: resolve_key(e.key_ref) for k, e in phases.load_endpoints(s).items()}))",
         str(store.root), store.run_id],
        env={**base_env(), modal_target.API_KEY_ENV: "the-team-key", "GUIDED_AB_STATE_DIR": str(store.root / ".." / "elsewhere"),
             "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120, cwd="/",
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == keys

    # teardown stops the apps and deletes their secrets: the run's keys stop working with the run
    phases.teardown(store, log=lambda m: None)
    assert fake.secrets == {}


def test_a_crashed_runs_secret_goes_with_its_app_and_the_team_secret_is_never_touched(modal_run):
    fake, store = modal_run
    ep = modal_target.deploy(store.load_config().arm("auto"), store)
    fake.secrets["guided-ab-api-key"] = {"VLLM_API_KEY": "the-team-key"}  # the team's own (production) secret
    fake.apps[ep.app_name] = modal_target.AppSummary(ep.app_name, time.time() - 7200, "deployed")
    assert modal_target.reap(older_than_s=3600) == [ep.app_name]
    assert set(fake.secrets) == {"guided-ab-api-key"}


# -- local arms stay on their machine --------------------------------------------------------------
def _local_run(tmp_path: Path, host: str) -> RunStore:
    arm = {"target": "local", "model": "smollm2-135m"}
    cfg = parse_config({"name": "loc", "store": str(tmp_path / "runs"),
                        "arms": [{"name": "control", "role": "control", "backend": "guidance", **arm},
                                 {"name": "cand", "role": "candidate", "backend": "auto", **arm}],
                        "workload": {"size": 4, "observe_size": 0, "warmup": 0}})
    store = RunStore.create(cfg, "loc-run")
    phases.build_plans(cfg, store)
    phases.save_endpoints(store, {a.name: Endpoint(
        run_id=store.run_id, arm=a.name, target="local", base_url=f"http://127.0.0.1:{9000 + i}", model="m",
        backend=a.backend, key_ref=f"file:/nonexistent/{a.name}", started_at=time.time(), pid=999999, port=9000 + i, host=host,
    ) for i, a in enumerate(cfg.arms)})
    return store


def _snapshot(store: RunStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.dir)): p.read_bytes() for p in sorted(store.dir.rglob("*")) if p.is_file()}


def test_a_phase_for_local_arms_on_another_host_stops_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDED_AB_MACHINE", "box-b")
    store = _local_run(tmp_path, host="box-a")
    before = _snapshot(store)
    message = r"this run's arms are local to host box-a: run this phase there, or use modal/external arms"
    with pytest.raises(RunStateError, match=message):
        phases.run_requests(store.load_config(), store, "ab")
    with pytest.raises(RunStateError, match=message):
        phases.teardown(store, log=lambda m: None)
    with pytest.raises(RunStateError, match=message):
        phases.start_endpoints(store.load_config(), store, log=lambda m: None)  # a deploy re-run would "reuse" them
    assert _snapshot(store) == before, "nothing in the run changed"

    # the CLI says so and exits 2
    env = {**base_env(), "GUIDED_AB_MACHINE": "box-b", "GUIDED_AB_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    cli = subprocess.run([sys.executable, "-m", "guided_ab.cli", "teardown", "--run-id", store.run_id, "--store", str(store.root)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert cli.returncode == 2, (cli.stdout, cli.stderr)
    assert "this run's arms are local to host box-a" in cli.stdout + cli.stderr
    assert _snapshot(store) == before

    # on box-a the same phase goes ahead (the servers are gone: teardown records them stopped)
    monkeypatch.setenv("GUIDED_AB_MACHINE", "box-a")
    entries = phases.teardown(store, log=lambda m: None)
    assert [e["stopped"] for e in entries] == [False, False]
    # once stopped, the run holds nothing on box-a: deciding (and a `continue`) works anywhere
    monkeypatch.setenv("GUIDED_AB_MACHINE", "box-b")
    assert set(phases.load_endpoints(store)) == {"control", "cand"}
    phases.teardown(store, log=lambda m: None)


def test_local_arms_are_stamped_with_the_machine_that_started_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDED_AB_MACHINE", "box-a")
    store = _local_run(tmp_path, host="box-a")
    local = targets.target_for("local")
    started = Endpoint(run_id=store.run_id, arm="control", target="local", base_url="http://127.0.0.1:1", model="m",
                       backend="guidance")
    monkeypatch.setattr(local, "start", lambda arm, store, cores=None: started)
    assert targets.start_arm(store.load_config().arm("control"), store).host == "box-a"
    external = targets.target_for("external")
    monkeypatch.setattr(external, "start", lambda arm, store, cores=None: started.model_copy(update={"target": "external"}))
    remote_arm = store.load_config().arm("control").model_copy(update={"target": "external", "url": "http://127.0.0.1:1"})
    assert targets.start_arm(remote_arm, store).host is None  # reachable from anywhere
    # evaluate reads endpoints anywhere (it touches none)
    monkeypatch.setenv("GUIDED_AB_MACHINE", "box-b")
    assert set(phases.load_endpoints(store, anywhere=True)) == {"control", "cand"}
    with pytest.raises(RunStateError, match="local to host box-a"):
        phases.load_endpoints(store)


# -- the Docker work pool's deployments --------------------------------------------------------
def test_the_docker_pool_file_deploys_every_phase_from_the_orchestrator_image():
    """prefect.docker.yaml as Prefect's own loader reads it: every entrypoint is the flow it names,
    built and pushed with prefect-docker's steps, run in the image's working directory, and apart
    from prefect.yaml (whose `deploy --all` must never build an image)."""
    import importlib

    import yaml
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.utilities.templating import apply_values
    from rich.console import Console

    configs, actions = _load_deploy_configs_and_actions(REPO / "prefect.docker.yaml", console=Console(stderr=True))
    assert len(configs) >= 6, "Prefect's loader skipped the file"
    flows_deployed, pairs = set(), set()
    for dep in configs:
        path, _, name = dep["entrypoint"].partition(":")
        flow_obj = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        flows_deployed.add(flow_obj.name)
        pairs.add((flow_obj.name, dep["name"]))
        pool = dep["work_pool"]
        assert pool["name"] == "guided-ab-docker", dep
        built = {"image_name": "registry.example.com/guided-ab", "tag": "abc123", "image": "registry.example.com/guided-ab:abc123"}
        assert apply_values(pool["job_variables"], {"build-image": built})["image"] == built["image"]
    assert {"experiment", "deploy", "ab", "evaluate", "decide-teardown"} <= flows_deployed
    assert len(pairs) == len(configs), "two deployments of one flow under one name"

    steps = [next(iter(s)) for s in actions["build"] + actions["push"]]
    assert "prefect_docker.deployments.steps.build_docker_image" in steps
    assert "prefect_docker.deployments.steps.push_docker_image" in steps
    build = next(s for s in actions["build"] if "prefect_docker.deployments.steps.build_docker_image" in s)
    dockerfile = (REPO / next(iter(build.values()))["dockerfile"]).read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert actions["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    # the image holds every package the entrypoints import and the flows' requirements, no vLLM
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    assert {"requirements.txt", "guided_ab", "flows", "tasks", "modal_apps"} <= copied, copied
    assert not re.search(r"^vllm", (REPO / "requirements.txt").read_text(), re.M)
    ignored = (REPO / ".dockerignore").read_text()
    assert all(f"!{c}" in ignored or f"!{c}/" in ignored for c in copied), "the build context leaves out what is copied"

    # the process pool's file builds no image: `prefect deploy --all` there stays git-only
    process = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert not any("docker" in next(iter(s)) for s in process.get("build") or [])
    process_names = {(d["entrypoint"], d["name"]) for d in process["deployments"]}
    assert not process_names & {(d["entrypoint"], d["name"]) for d in configs}, "a Docker deployment would replace a process one"
