"""The Modal target, offline: the app module, the container's command, deploy/stop/readiness/cost
against a fake of the thin Modal-SDK layer only, the reaper, the dry run. One live test (marked
`modal`) deploys a tiny arm for real when MODAL_TOKEN_ID is set."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import typing
import uuid
from pathlib import Path

import pytest

from guided_ab.arms import modal as modal_target
from guided_ab.arms.base import Endpoint, resolve_key
from guided_ab.arms.targets import start_arm, stop_endpoint, wait_arm
from guided_ab.arms.vllm_args import ATTRIBUTION_MIDDLEWARE, CLI_MODULE, SERVED_MODEL_NAME, SERVER_MODULE, server_args, server_env
from guided_ab.config import Arm, ConfigError, ExperimentConfig, ModalSettings, load_config
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "auto-vs-guidance.yaml"
BACKENDS = list(typing.get_args(Arm.model_fields["backend"].annotation))

# Run in a child Python before anything else: every socket connection or DNS lookup fails.
NO_NETWORK = """
import socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this test")
socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
"""


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment without any Modal credentials (no MODAL_* variables, an empty HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_") and k != "GUIDED_AB_ARM"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(REPO), MODAL_CONFIG_PATH=str(home / "none.toml"), **extra)
    return env


def run_child(code: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK + code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def modal_arm(**kw) -> Arm:
    settings = kw.pop("modal", {})
    base = dict(name="auto", role="candidate", target="modal", backend="auto", model="Qwen/Qwen2.5-0.5B-Instruct")
    return Arm(**{**base, **kw}, modal=ModalSettings(**settings))


def image_layers(image) -> list[list[str]]:
    """The Dockerfile commands of each layer of a modal.Image, top layer first (offline).

    Modal keeps an image's recipe in the closure of its loader; this reads it the way the
    builder will (`dockerfile_function(builder_version)`), without any call to Modal.
    """
    from modal._utils.async_utils import synchronizer

    layers, todo = [], [synchronizer._translate_in(image)]
    while todo:
        img = todo.pop(0)
        cells = dict(zip(img._load.__code__.co_freevars, (c.cell_contents for c in img._load.__closure__ or ())))
        if cells.get("dockerfile_function"):
            layers.append(cells["dockerfile_function"]("2025.06").commands)
        todo += list((cells.get("base_images") or {}).values())
        if cells.get("base_image") is not None:
            todo.append(cells["base_image"])
    return layers


def image_env(image) -> dict[str, str]:
    env: dict[str, str] = {}
    for layer in reversed(image_layers(image)):
        for cmd in layer:
            if cmd.startswith("ENV "):
                key, _, value = cmd[4:].partition("=")
                env[key] = shlex.split(value)[0] if value else ""
    return env


# -- the app module ----------------------------------------------------------------------------
def test_app_module_imports_offline_without_token(tmp_path):
    out = run_child(
        """
import json, time
t = time.monotonic()
import modal, modal_apps.vllm_arm as v
print(json.dumps({"s": time.monotonic() - t, "app": v.app.name, "serve": type(v.serve).__name__,
                  "is_function": isinstance(v.serve, modal.Function), "vllm": v.VLLM_VERSION}))
""",
        offline_env(tmp_path),
    )
    assert out["app"] == "guided-ab-vllm-arm" and out["is_function"], out
    assert re.fullmatch(r"\d+\.\d+\.\d+", out["vllm"]), "the image must pin one vLLM release"


def test_image_pins_vllm_and_ships_our_sources():
    from modal_apps import vllm_arm

    spec = vllm_arm.ArmSpec(modal_arm(), "gab-x-run-auto")
    image = vllm_arm.build_image(spec)
    commands = [c for layer in image_layers(image) for c in layer]
    assert any(f"vllm=={vllm_arm.VLLM_VERSION}" in c for c in commands), commands
    from modal._utils.async_utils import synchronizer

    # the attribution middleware is imported by the server from the guided_ab package
    assert "guided_ab" in synchronizer._translate_in(image)._added_python_source_set


def test_function_definition_follows_the_arms_modal_settings():
    """GPU type/count, Volumes, secret, port, timeouts, scale-down and concurrency, as Modal
    will receive them (read offline from the Function object and its loader's closure)."""
    from modal._utils.async_utils import synchronizer

    from modal_apps import vllm_arm

    arm = modal_arm(modal=dict(gpu="H100!", gpu_count=2, startup_timeout_s=2400, scaledown_window_s=600,
                               max_concurrent_inputs=16, api_key_secret="team-key"))
    app, fn = vllm_arm.build_arm_app(vllm_arm.ArmSpec(arm, "gab-e-r-auto"))
    f = synchronizer._translate_in(fn)
    assert app.name == "gab-e-r-auto" and f._spec.gpus == "H100!:2"
    assert sorted(f._spec.volumes) == [vllm_arm.HF_CACHE_DIR, vllm_arm.VLLM_CACHE_DIR]
    assert [s._rep for s in f._spec.secrets] == ["modal.Secret.from_name('team-key')"]
    assert f._webhook_config.web_server_port == 8000 and f._webhook_config.web_server_startup_timeout == 2400
    cells = dict(zip(f._load.__code__.co_freevars, (c.cell_contents for c in f._load.__closure__ or ())))
    assert (cells["startup_timeout"], cells["scaledown_window"], cells["max_concurrent_inputs"], cells["max_containers"]) == (
        2400, 600, 16, 1)


def test_deploy_time_parameters_reach_the_container(tmp_path):
    """The arm goes into the image's ENV layer; a container importing the module with that
    environment resolves the function the way Modal's container runtime does and builds the
    server command for exactly that arm."""
    from modal_apps import vllm_arm

    arm = modal_arm(
        name="guidance", role="control", backend="guidance", model="Qwen/Qwen3-Next-80B-A3B-Instruct",
        server_args=["--max-num-seqs", "16"],
        modal=dict(gpu="H100", gpu_count=4, revision="abc123", max_model_len=32768, startup_timeout_s=2400),
    )
    name = modal_target.app_name("auto-vs-guidance", "guidance", "auto-vs-guidance-20251027-120000-ab12")
    env = image_env(vllm_arm.build_image(vllm_arm.ArmSpec(arm, name)))
    assert Arm.model_validate_json(env[vllm_arm.ENV_ARM]) == arm
    assert env[vllm_arm.ENV_APP_NAME] == name

    out = run_child(
        """
import json, os
from modal_proto import api_pb2
from modal._runtime.user_code_imports import import_single_function_service
fdef = api_pb2.Function(module_name="modal_apps.vllm_arm", function_name="serve", implementation_name="serve",
                        app_name=os.environ["GUIDED_AB_APP_NAME"])
service = import_single_function_service(fdef, None)
import modal_apps.vllm_arm as v
spec = v.ArmSpec.from_environment(os.environ)
server_env = v.container_env(spec.arm, os.environ)
print(json.dumps({"app": service.app.name, "callable": service._user_defined_callable.__qualname__,
                  "arm": spec.arm.model_dump(mode="json"), "cmd": v.container_command(spec.arm, "python"),
                  "env": {k: server_env[k] for k in ("VLLM_API_KEY", "GUIDED_AB_BACKEND", "PYTHONPATH")}}))
""",
        offline_env(tmp_path, **env, VLLM_API_KEY="k-123"),
    )
    assert out["app"] == name and out["callable"] == "serve"
    assert Arm.model_validate(out["arm"]) == arm
    assert out["cmd"] == [
        "python", "-m", SERVER_MODULE,
        *server_args(arm, arm.model, host="0.0.0.0", port=8000, extra=[
            "--revision", "abc123", "--max-model-len", "32768", "--tensor-parallel-size", "4",
        ]),
    ]
    assert out["cmd"][-2:] == ["--max-num-seqs", "16"], "the arm's own server_args come last"
    assert out["env"]["VLLM_API_KEY"] == "k-123" and out["env"]["GUIDED_AB_BACKEND"] == "guidance"
    assert out["env"]["PYTHONPATH"].split(os.pathsep)[0] == "/root"


def test_serve_starts_the_server_from_the_baked_environment(monkeypatch):
    """The body Modal runs in the container: one vLLM process, command and env from the spec."""
    from modal_apps import vllm_arm

    arm = modal_arm(backend="xgrammar", modal=dict(gpu_count=2))
    for key, value in vllm_arm.ArmSpec(arm, "gab-e-r-auto").environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VLLM_API_KEY", "secret-from-modal")
    started = []
    monkeypatch.setattr(vllm_arm.subprocess, "Popen", lambda cmd, env: started.append((cmd, env)))
    vllm_arm._serve_impl()
    (cmd, env), = started
    assert cmd == vllm_arm.container_command(arm)
    assert env["VLLM_API_KEY"] == "secret-from-modal" and env["GUIDED_AB_BACKEND"] == "xgrammar"


def test_by_hand_overrides_reach_the_spec():
    from modal_apps import vllm_arm

    spec = vllm_arm.ArmSpec.from_environment({
        "GUIDED_AB_MODAL_BACKEND": "xgrammar", "GUIDED_AB_MODAL_MODEL": "Qwen/Qwen2.5-1.5B-Instruct",
        "GUIDED_AB_MODAL_GPU": "A10G", "GUIDED_AB_MODAL_GPU_COUNT": "2", "GUIDED_AB_MODAL_MAX_MODEL_LEN": "8192",
        "GUIDED_AB_MODAL_REVISION": "main", "GUIDED_AB_MODAL_SERVER_ARGS": "--enforce-eager --max-num-seqs 8",
        "GUIDED_AB_MODAL_APP_NAME": "gab-by-hand",
    })
    a = spec.arm
    assert (spec.app_name, a.backend, a.model, a.modal.gpu, a.modal.gpu_count) == (
        "gab-by-hand", "xgrammar", "Qwen/Qwen2.5-1.5B-Instruct", "A10G", 2)
    assert a.server_args == ["--enforce-eager", "--max-num-seqs", "8"]
    assert vllm_arm.modal_extra_args(a) == ["--revision", "main", "--max-model-len", "8192", "--tensor-parallel-size", "2"]


def test_container_refuses_to_start_without_the_key():
    from modal_apps import vllm_arm

    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        vllm_arm.container_env(modal_arm(), {})


# -- one source of truth for the vLLM flags ----------------------------------------------------
def _normalized(cmd: list[str], extra: list[str]) -> list[str]:
    """Drop the interpreter, the target-specific host/port values and the Modal-only flags."""
    args = list(cmd[cmd.index("serve") + 1:] if CLI_MODULE in cmd else cmd[cmd.index(SERVER_MODULE) + 1:])
    for flag in ("--host", "--port"):
        args[args.index(flag) + 1] = "<" + flag + ">"
    if extra:
        i = next(i for i in range(len(args)) if args[i:i + len(extra)] == extra)
        del args[i:i + len(extra)]
    return args


@pytest.mark.parametrize("backend", BACKENDS)
def test_vllm_arguments_are_identical_for_local_and_modal(backend, tmp_path, monkeypatch):
    """The local target's real start code (its process spawn captured) and the Modal container
    build the same vLLM arguments for the same arm; only host/port and Modal's own flags differ."""
    from guided_ab.arms import local
    from modal_apps import vllm_arm

    spawned = {}

    class FakePopen:
        pid = 2**22 + 1

        def __init__(self, cmd, env=None, **kwargs):
            spawned.update(cmd=cmd, env=env)

    monkeypatch.setattr(local.subprocess, "Popen", FakePopen)
    common = dict(name="arm-x", backend=backend, model="Qwen/Qwen2.5-0.5B-Instruct", server_args=["--seed", "7"])
    local_arm = Arm(role="control", target="local", **common)
    cfg = ExperimentConfig(name="same-args", arms=[local_arm, Arm(role="candidate", target="local", **{**common, "name": "b"})],
                           store=str(tmp_path / "runs"))
    store = RunStore.create(cfg, "same-args-run")
    ep = local.start(local_arm, store, python="python", model=local_arm.model, version="test", cli=True)
    local_cmd = spawned["cmd"]

    m_arm = modal_arm(role="control", **common, modal=dict(gpu_count=2, max_model_len=4096))
    modal_cmd = vllm_arm.container_command(m_arm, "python", cli=True)
    extra = vllm_arm.modal_extra_args(m_arm)
    assert extra == ["--max-model-len", "4096", "--tensor-parallel-size", "2"]
    assert local_cmd[1:4] == modal_cmd[1:4] == ["-m", CLI_MODULE, "serve"]  # `vllm serve`
    assert _normalized(local_cmd, []) == _normalized(modal_cmd, extra)
    assert ["--structured-outputs-config.backend", backend] == modal_cmd[modal_cmd.index("--structured-outputs-config.backend"):][:2]
    assert ATTRIBUTION_MIDDLEWARE in modal_cmd
    # the server environment comes from the same builder too
    m_env = vllm_arm.container_env(m_arm, {"VLLM_API_KEY": "k"})
    assert spawned["env"]["GUIDED_AB_BACKEND"] == m_env["GUIDED_AB_BACKEND"] == backend
    assert set(server_env(local_arm, "k")) <= set(spawned["env"]) and set(server_env(m_arm, "k")) <= set(m_env)
    local.stop(ep.model_copy(update={"pid": None}))


# -- the fake of the thin SDK layer ------------------------------------------------------------
class FakeModal:
    """Stands in for modal_target.ModalSDK: the same methods, state in memory."""

    def __init__(self, workspace: str = "ws"):
        self.workspace = workspace
        self.apps: dict[str, modal_target.AppSummary] = {}
        self.deployed: list[tuple[object, str]] = []
        self.stop_calls: list[str] = []
        self.fail_deploy: Exception | None = None
        self.secrets: dict[str, dict[str, str]] = {}  # name -> values, as modal.Secret holds them

    def deploy_app(self, app, name):
        if self.fail_deploy:
            raise self.fail_deploy
        self.deployed.append((app, name))
        self.apps[name] = modal_target.AppSummary(name, time.time(), "deployed")
        return f"https://{self.workspace}--{name}-serve.modal.run"

    def web_url(self, name):
        app = self.apps.get(name)
        return f"https://{self.workspace}--{name}-serve.modal.run" if app and app.live else None

    def find_app(self, name):
        app = self.apps.get(name)
        return app if app and app.live else None

    def stop_app(self, name):
        self.stop_calls.append(name)
        app = self.apps.get(name)
        if not app or not app.live:
            return False
        self.apps[name] = modal_target.AppSummary(name, app.created_at, "stopped")
        return True

    def list_apps(self):
        return list(self.apps.values())

    def put_secret(self, name, values):
        self.secrets[name] = dict(values)

    def delete_secret(self, name):
        self.secrets.pop(name, None)


@pytest.fixture()
def fake():
    f = FakeModal()
    with modal_target.use_sdk(f):
        yield f


@pytest.fixture()
def store(tmp_path):
    cfg = load_config(CONFIG).model_copy(update={"store": str(tmp_path / "runs")})
    return RunStore.create(cfg, "auto-vs-guidance-20251027-120000-ab12")


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")
    return "test-key"


def test_deploy_builds_the_arm_app_and_returns_its_endpoint(fake, store, api_key):
    import modal

    cfg = store.load_config()
    arm = cfg.arm("auto")
    ep = start_arm(arm, store)  # the dispatch of the deploy phase
    (app, name), = fake.deployed
    assert isinstance(app, modal.App) and app.name == name == "gab-auto-vs-guidance-20251027-120000-ab12-auto"
    assert ep.target == "modal" and ep.app_name == name
    assert ep.base_url == f"https://ws--{name}-serve.modal.run"
    assert ep.model == SERVED_MODEL_NAME and ep.backend == "auto"
    assert ep.key_ref == f"derived:GUIDED_AB_MODAL_API_KEY:{store.run_id}/auto" and "test-key" not in ep.model_dump_json()
    s = arm.modal  # GPUs + the CPU cores and memory the container requests (held warm throughout)
    assert ep.cost_per_hour == pytest.approx(3.95 * 4 + s.cpu * s.cpu_cost_per_core_hour + s.memory_gib * s.memory_cost_per_gib_hour)
    assert ep.started_at and abs(ep.started_at - time.time()) < 60


def test_deploy_is_idempotent_per_run_and_arm(fake, store, api_key):
    arm = store.load_config().arm("guidance")
    first = modal_target.deploy(arm, store)
    fake.apps[first.app_name] = modal_target.AppSummary(first.app_name, first.started_at - 30, "deployed")
    again = modal_target.deploy(arm, store)
    assert len(fake.deployed) == 1, "a deployed app of this run is reused, not deployed again"
    assert again.base_url == first.base_url and again.started_at == first.started_at - 30
    other = modal_target.deploy(store.load_config().arm("auto"), store)
    assert other.app_name != first.app_name and len(fake.deployed) == 2


def test_deploy_redeploys_an_app_that_was_stopped(fake, store, api_key):
    arm = store.load_config().arm("guidance")
    ep = modal_target.deploy(arm, store)
    assert modal_target.stop(ep)
    modal_target.deploy(arm, store)
    assert len(fake.deployed) == 2


@pytest.mark.parametrize("change, message", [
    ({"model": "smollm2-135m"}, "Hugging Face model id"),
    ({"target": "local"}, "not 'modal'"),
])
def test_deploy_refuses_arms_that_cannot_work(fake, store, api_key, change, message):
    arm = store.load_config().arm("auto").model_copy(update=change)
    with pytest.raises(ConfigError, match=message):
        modal_target.deploy(arm, store)
    assert fake.deployed == []


def test_deploy_needs_the_local_api_key_first(fake, store, monkeypatch):
    monkeypatch.delenv(modal_target.API_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="GUIDED_AB_MODAL_API_KEY"):
        modal_target.deploy(store.load_config().arm("auto"), store)
    assert fake.deployed == []


def test_deploy_failure_says_which_arm_and_app(fake, store, api_key, monkeypatch):
    fake.fail_deploy = PermissionError("token rejected")
    with pytest.raises(modal_target.ModalTargetError, match=r"arm 'auto'.*gab-auto-vs-guidance.*token rejected"):
        modal_target.deploy(store.load_config().arm("auto"), store)
    fake.fail_deploy = None
    monkeypatch.setattr(fake, "find_app", lambda name: (_ for _ in ()).throw(ConnectionError("no route to Modal")))
    with pytest.raises(modal_target.ModalTargetError, match="no route to Modal"):
        modal_target.deploy(store.load_config().arm("auto"), store)


def test_stop_and_cost_through_the_generic_teardown(fake, store, api_key):
    ep = modal_target.deploy(store.load_config().arm("auto"), store)
    ep = ep.model_copy(update={"started_at": time.time() - 1800})  # held for half an hour
    entry = stop_endpoint(ep)
    assert entry["stopped"] is True and fake.apps[ep.app_name].state == "stopped"
    assert entry["cost_usd"] == pytest.approx(0.5 * store.load_config().arm("auto").modal.cost_per_hour, rel=0.01)
    again = stop_endpoint(ep)  # already stopped: fine, nothing to do
    assert again["stopped"] is False
    assert modal_target.stop(ep.model_copy(update={"app_name": "gab-never-deployed"})) is False
    assert modal_target.stop(ep.model_copy(update={"app_name": None})) is False


def test_reap_stops_only_old_live_apps_of_this_pipeline(fake):
    now = time.time()
    for name, age, state in [
        ("gab-exp-20251027-old-auto", 7200, "deployed"),
        ("gab-exp-20251027-old-guidance", 7200, "deployed"),
        ("gab-exp-20251027-new-auto", 60, "deployed"),
        ("gab-exp-20251027-gone-auto", 9000, "stopped"),
        ("production-qwen", 90000, "deployed"),
    ]:
        fake.apps[name] = modal_target.AppSummary(name, now - age, state)
    assert sorted(modal_target.reap("gab-", 3600, now=now)) == ["gab-exp-20251027-old-auto", "gab-exp-20251027-old-guidance"]
    assert fake.apps["production-qwen"].live and fake.apps["gab-exp-20251027-new-auto"].live
    assert "gab-exp-20251027-gone-auto" not in fake.stop_calls
    assert modal_target.reap("gab-exp-20251027-new-", 0, now=now) == ["gab-exp-20251027-new-auto"]
    assert modal_target.reap(now=now) == []
    with pytest.raises(ConfigError, match="must start with 'gab-'"):
        modal_target.reap("production", 0)


def test_reap_by_run_prefix_covers_every_arm_of_that_run(fake, store, api_key):
    cfg = store.load_config()
    eps = [modal_target.deploy(a, store) for a in cfg.arms]
    prefix = modal_target.run_prefix(cfg.name, store.run_id)
    fake.apps["gab-auto-vs-guidance-other-run-auto"] = modal_target.AppSummary("gab-auto-vs-guidance-other-run-auto", 0, "deployed")
    assert sorted(modal_target.reap(prefix, 0)) == sorted(ep.app_name for ep in eps)
    assert fake.apps["gab-auto-vs-guidance-other-run-auto"].live


@pytest.mark.parametrize("experiment, arm, run_id", [
    ("auto-vs-guidance", "guidance", "auto-vs-guidance-20251027-120000-ab12"),
    ("e" * 39, "a" * 39, "e" * 39 + "-20251027-120000-ab12"),
    ("exp", "candidate-with-a-very-long-name-number-1", "some.Run_ID.that-is-not-from-new-run-id-at-all-1234567890"),
])
def test_app_names_are_valid_unique_and_share_a_run_prefix(experiment, arm, run_id):
    from modal._utils.name_utils import is_valid_object_name

    name = modal_target.app_name(experiment, arm, run_id)
    assert len(name) <= 64 and is_valid_object_name(name) and re.fullmatch(r"[a-z0-9-]+", name), name
    assert name.startswith(modal_target.run_prefix(experiment, run_id)) and name.startswith("gab-")
    other = modal_target.app_name(experiment, arm[:-1] + "2", run_id)
    assert other != name and other.startswith(modal_target.run_prefix(experiment, run_id))
    assert modal_target.app_name(experiment, arm, run_id + "x") != name


# -- readiness against a real HTTP server ------------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    cold_answers = 3
    hits: list[int] = []

    def do_GET(self):  # noqa: N802
        code = 503 if len(self.hits) < self.cold_answers else 200
        self.hits.append(code)
        body = b"starting" if code == 503 else b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(handler, port: int = 0) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _endpoint(url: str) -> Endpoint:
    return Endpoint(run_id="r", arm="auto", target="modal", base_url=url, model="m", backend="auto", app_name="gab-x")


def test_wait_ready_tolerates_503_cold_start():
    handler = type("Cold", (_Health,), {"hits": [], "cold_answers": 3})
    server = _serve(handler)
    try:
        ep = _endpoint(f"http://127.0.0.1:{server.server_address[1]}")
        waited = modal_target.wait_ready(ep, 20, poll_s=0.05)
        assert handler.hits == [503, 503, 503, 200] and waited < 20
        assert wait_arm(ep, 5) >= 0  # the dispatch reaches the Modal target
    finally:
        server.shutdown()


def test_wait_ready_keeps_waiting_through_connection_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = type("Late", (_Health,), {"hits": [], "cold_answers": 0})
    started = {}

    def start_later():
        time.sleep(0.6)
        started["server"] = _serve(handler, port)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        waited = modal_target.wait_ready(_endpoint(f"http://127.0.0.1:{port}"), 20, poll_s=0.1)
        assert waited >= 0.5 and handler.hits == [200]
    finally:
        t.join()
        started["server"].shutdown()


def test_wait_ready_gives_up_at_the_deadline_with_the_last_answer():
    handler = type("Never", (_Health,), {"hits": [], "cold_answers": 10**9})
    server = _serve(handler)
    try:
        t0 = time.monotonic()
        with pytest.raises(modal_target.ModalTargetError, match=r"not ready within 1 s \(last: HTTP 503\).*modal app logs gab-x"):
            modal_target.wait_ready(_endpoint(f"http://127.0.0.1:{server.server_address[1]}"), 1, poll_s=0.1)
        assert time.monotonic() - t0 < 5
    finally:
        server.shutdown()


# -- the real SDK layer uses APIs that exist in the installed Modal ----------------------------
def test_sdk_layer_calls_exist_in_installed_modal():
    import modal
    from modal.exception import NotFoundError  # noqa: F401

    for attr in ("deploy", "lookup", "stop", "info"):
        assert callable(getattr(modal.App, attr)), attr
    assert callable(modal.Function.from_name) and callable(modal.Function.get_web_url)
    assert callable(modal.Environment.from_context) and callable(modal.Environment.from_name)
    assert hasattr(modal.Environment, "apps") and callable(modal.enable_output)
    from modal.types import AppState

    assert {"deployed", "stopped", "stopping"} <= {s.value for s in AppState}


# -- config and dry run ------------------------------------------------------------------------
def test_the_seed_config_validates():
    cfg = load_config(CONFIG)
    assert (cfg.control.name, cfg.control.backend, cfg.candidates[0].backend) == ("guidance", "guidance", "auto")
    assert all(a.target == "modal" and a.modal.gpu == "H100!" and a.modal.gpu_count in (2, 4) for a in cfg.arms)
    assert "Qwen" in cfg.control.model and cfg.workload.size == 50
    assert cfg.decision.success_margin == 0.05
    assert cfg.server_start_timeout_s >= max(a.modal.startup_timeout_s for a in cfg.arms)


def test_commented_external_control_example_validates():
    text = CONFIG.read_text()
    block = re.search(r"^  # - name: production\n((?:  #   .*\n)+)", text, re.M)
    assert block, "the config shows an existing endpoint as the control"
    lines = ["- name: production", *(line[4:] for line in block.group(1).splitlines())]
    import yaml

    external = yaml.safe_load("\n".join(lines))[0]
    cfg = load_config(CONFIG)
    data = cfg.model_dump()
    data["arms"][0] = external
    ExperimentConfig.model_validate(data)


def test_dry_run_prints_apps_gpus_requests_and_cost_offline(tmp_path):
    out = run_child(
        """
import json
from guided_ab.config import load_config
from guided_ab.dry_run import describe_plan, plan_experiment
cfg = load_config("configs/auto-vs-guidance.yaml")
p = plan_experiment(cfg, run_id="auto-vs-guidance-20251027-120000-ab12")
print(json.dumps({"text": describe_plan(cfg, run_id=p.run_id), "requests": {a.arm: [a.warmup, a.observe, a.ab] for a in p.arms},
                  "cost": p.cost_usd, "arm_costs": [a.cost_usd for a in p.arms], "held": [a.held_s for a in p.arms]}))
""",
        offline_env(tmp_path),
    )
    text = out["text"]
    assert "gab-auto-vs-guidance-20251027-120000-ab12-guidance" in text and "H100! x 4" in text
    assert out["requests"] == {"guidance": [1, 0, 50], "auto": [1, 6, 50]}
    # held = startup 600 s + observe ceil(6/2)*14 s + A/B ceil(102/2)*14 s; 4 x 3.95 $/h per arm
    # plus the container's CPU cores and memory (it is held warm from deploy to teardown)
    held = 600 + 3 * 14 + 51 * 14
    assert out["held"] == [held, held]
    per_hour = load_config(CONFIG).arms[0].modal.cost_per_hour
    assert 15.8 < per_hour < 17
    assert out["cost"] == pytest.approx(2 * held / 3600 * per_hour)
    assert f"${out['cost']:.2f}" in text and "[" not in text  # no rich markup surprises in the CLI


def test_dry_run_counts_follow_phases_and_repeats():
    from guided_ab.dry_run import plan_experiment

    cfg = load_config(CONFIG)
    data = cfg.model_dump()
    data["workload"].update(repeats=2, size=20, warmup=2)
    data["phases"] = ["deploy", "ab", "evaluate", "decide"]
    p = plan_experiment(ExperimentConfig.model_validate(data), run_id="r-1", latency_s=10, modal_startup_s=100)
    assert [(a.warmup, a.observe, a.ab) for a in p.arms] == [(2, 0, 40), (2, 0, 40)]
    assert p.requests == 84 and p.observe_s == 0 and p.ab_s == 42 * 10
    assert p.arms[0].held_s == 100 + 420
    assert p.slow_start_cost_usd > p.cost_usd


# -- live: deploys a tiny arm on Modal for real ------------------------------------------------
@pytest.mark.modal
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("MODAL_TOKEN_ID"), reason="MODAL_TOKEN_ID is not set: no Modal credentials")
def test_live_tiny_arm_on_modal(tmp_path, monkeypatch):
    """Deploy Qwen2.5-0.5B on one L4 with the guidance backend, send one structured request,
    check the answer and the attribution header, stop the app. Creates (and deletes) its own
    secret, so only a Modal token is needed. Cost: an L4 for ~5-15 minutes."""
    import httpx
    import modal
    from jsonschema import validate

    key = "gab-live-" + uuid.uuid4().hex
    secret = "gab-live-test-" + uuid.uuid4().hex[:8]
    modal.Secret.objects.create(secret, {"VLLM_API_KEY": key})
    monkeypatch.setenv(modal_target.API_KEY_ENV, key)
    arm = modal_arm(
        name="live", role="candidate", backend="guidance",
        modal=dict(gpu=os.environ.get("GUIDED_AB_LIVE_GPU", "L4"), gpu_count=1, gpu_cost_per_hour=0.8, max_model_len=4096,
                   startup_timeout_s=1500, scaledown_window_s=60, api_key_secret=secret),
    )
    control = arm.model_copy(update={"name": "control", "role": "control"})
    cfg = ExperimentConfig(name="live-test", arms=[control, arm], store=str(tmp_path / "runs"))
    store = RunStore.create(cfg)
    ep = None
    try:
        ep = modal_target.deploy(arm, store)
        modal_target.wait_ready(ep, 1500)
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"], "additionalProperties": False}
        r = httpx.post(
            ep.base_url + "/v1/chat/completions", timeout=300,
            headers={"Authorization": f"Bearer {resolve_key(ep.key_ref)}"},  # the run's own key, derived from `key`
            json={"model": ep.model, "max_tokens": 64, "temperature": 0,
                  "messages": [{"role": "user", "content": "A person named Ada, 36 years old, as JSON."}],
                  "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}},
        )
        assert r.status_code == 200, r.text
        validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
        assert r.headers.get("x-guided-ab-backend") == "guidance"
    finally:
        try:
            if ep is not None:
                assert modal_target.stop(ep)
                assert modal_target.stop(ep) is False
                found = modal_target.sdk().find_app(ep.app_name)
                assert found is None or not found.live
        finally:
            modal.Secret.objects.delete(secret, allow_missing=True)
