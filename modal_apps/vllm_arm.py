"""One arm of an experiment as a Modal app: vLLM's OpenAI-compatible server on GPUs.

The pipeline deploys one app per arm and run from code (guided_ab.arms.modal):
it builds `build_app(ArmSpec(arm, app_name))` and deploys it under `app_name`. The arm
(backend, model, revision, max model length, GPU type/count = tensor parallel size, extra vLLM
arguments) is baked into the image's environment as JSON (`GUIDED_AB_ARM`), so the container,
which imports this module again, rebuilds the same app and starts the same server command.

The server command comes from guided_ab.arms.vllm_args.server_args / server_env, the builder the
local target uses too, so an arm's vLLM flags are the same on both targets; the container adds
only what is Modal-specific (`modal_extra_args`: revision, max model length, tensor parallel).

How many containers serve the arm is the arm's `modal.replicas` (min_containers, max_containers,
and the autoscaler's target_inputs per container), deploy-time settings of the function, the same
in every container. Each container runs its own vLLM server; the attribution middleware names
the container (MODAL_TASK_ID) in every answer, so the records say which one served a request.

By hand (same app, parameters from the environment; see docs/modal.md):

    GUIDED_AB_MODAL_BACKEND=auto GUIDED_AB_MODAL_MODEL=Qwen/Qwen2.5-0.5B-Instruct \\
    GUIDED_AB_MODAL_GPU=L4 GUIDED_AB_MODAL_APP_NAME=gab-try-auto modal deploy -m modal_apps.vllm_arm

Importing this module needs neither network nor a Modal token: it only describes the app.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import modal

from guided_ab.arms.vllm_args import cli_works_here, server_args, server_command, server_env
from guided_ab.config import Arm, ModalReplicas, ModalSettings

# The official CUDA build of vLLM, pinned: results are only comparable within one version.
VLLM_VERSION = "0.32.0"
CUDA_BASE_IMAGE = "nvidia/cuda:12.9.0-devel-ubuntu22.04"
PYTHON_VERSION = "3.12"
HOST = "0.0.0.0"
PORT = 8000
FUNCTION_NAME = "serve"  # the web function: its URL is the arm's base URL
HF_CACHE_DIR = "/root/.cache/huggingface"
VLLM_CACHE_DIR = "/root/.cache/vllm"
HF_CACHE_VOLUME = "guided-ab-hf-cache"
VLLM_CACHE_VOLUME = "guided-ab-vllm-cache"
SOURCE_ROOT = "/root"  # where Modal puts local Python sources (guided_ab, modal_apps)
# Longest single request (a web function's input) before Modal cancels it.
REQUEST_TIMEOUT_S = 30 * 60
# The default: one container per arm, held warm from deploy to teardown: min_containers=1 starts
# it at deploy (not at the first request) and keeps it however long the other arm takes to start
# or the pipeline waits between phases; max_containers=1: autoscaling would blur the comparison.
# An arm's `modal.replicas` changes both (config.ModalReplicas says when that is worth it).
MIN_CONTAINERS = ModalReplicas().min_containers
MAX_CONTAINERS = ModalReplicas().max_containers

# Baked into the image: what the container reads back when it imports this module.
ENV_ARM = "GUIDED_AB_ARM"  # the Arm as JSON
ENV_APP_NAME = "GUIDED_AB_APP_NAME"
ENV_RUN_KEY_SECRET = "GUIDED_AB_RUN_KEY_SECRET"  # the modal.Secret with the run's own VLLM_API_KEY
# Read only on the deploying machine, for `modal deploy -m modal_apps.vllm_arm` by hand:
# each overrides one field of the arm (or of the default arm when GUIDED_AB_ARM is unset).
OVERRIDES = {
    "GUIDED_AB_MODAL_APP_NAME": "app name",
    "GUIDED_AB_MODAL_BACKEND": "backend",
    "GUIDED_AB_MODAL_MODEL": "model (Hugging Face id)",
    "GUIDED_AB_MODAL_REVISION": "model revision",
    "GUIDED_AB_MODAL_MAX_MODEL_LEN": "max model length",
    "GUIDED_AB_MODAL_GPU": "GPU type",
    "GUIDED_AB_MODAL_GPU_COUNT": "GPU count = tensor parallel size",
    "GUIDED_AB_MODAL_SERVER_ARGS": "extra vLLM arguments (shell words)",
    "GUIDED_AB_MODAL_MIN_CONTAINERS": "containers kept warm (replicas.min_containers)",
    "GUIDED_AB_MODAL_MAX_CONTAINERS": "most containers under load (replicas.max_containers)",
    "GUIDED_AB_MODAL_TARGET_INPUTS": "requests per container the autoscaler aims at (replicas.target_inputs)",
}
DEFAULT_APP_NAME = "guided-ab-vllm-arm"
DEFAULT_ARM = Arm(
    name="arm", role="candidate", target="modal", backend="auto", model="Qwen/Qwen2.5-0.5B-Instruct",
    modal=ModalSettings(gpu="L4", gpu_count=1, gpu_cost_per_hour=0.80, startup_timeout_s=900, scaledown_window_s=120),
)


@dataclass(frozen=True)
class ArmSpec:
    """What one deployed app serves: an arm, under an app name (and the App's tags: run, arm,
    backend, for the reaper and Modal's billing report by tag; not baked into the image)."""

    arm: Arm
    app_name: str
    tags: Mapping[str, str] | None = None
    # containers kept warm, when not the arm's own replicas.min_containers (deploy-time only, not
    # baked into the image): 0 for phase 3's live control, scaled to zero between monitoring runs
    # (guided_ab/promote.py)
    min_containers: int | None = None
    # an experiment's app: the modal.Secret holding the run's own key (guided_ab/arms/modal.py),
    # mounted after the arm's `modal.api_key_secret` (which keeps e.g. HF_TOKEN), so its
    # VLLM_API_KEY wins; None: the arm's secret alone (phase 3's production apps, a by-hand deploy)
    run_key_secret: str | None = None

    @property
    def replicas(self) -> ModalReplicas:
        """The autoscaler settings the app's function is deployed with: the arm's `modal.replicas`,
        with min_containers overridden where the spec says so."""
        r = self.arm.modal.replicas
        if self.min_containers is None:
            return r
        return ModalReplicas(**{**r.model_dump(), "min_containers": min(self.min_containers, r.max_containers)})

    def environment(self) -> dict[str, str]:
        """The variables baked into the image, from which the container rebuilds this spec."""
        return {ENV_ARM: self.arm.model_dump_json(), ENV_APP_NAME: self.app_name,
                **({ENV_RUN_KEY_SECRET: self.run_key_secret} if self.run_key_secret else {})}

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ArmSpec:
        """The spec a container (or a by-hand deploy) reads from its environment."""
        arm = Arm.model_validate_json(env[ENV_ARM]) if env.get(ENV_ARM) else DEFAULT_ARM
        arm = _apply_overrides(arm, env)
        return cls(arm=arm, app_name=env.get("GUIDED_AB_MODAL_APP_NAME") or env.get(ENV_APP_NAME) or DEFAULT_APP_NAME,
                   run_key_secret=env.get(ENV_RUN_KEY_SECRET) or None)


def _apply_overrides(arm: Arm, env: Mapping[str, str]) -> Arm:
    data = arm.model_dump()
    modal_data = data["modal"]
    if env.get("GUIDED_AB_MODAL_BACKEND"):
        data["backend"] = env["GUIDED_AB_MODAL_BACKEND"]
    if env.get("GUIDED_AB_MODAL_MODEL"):
        data["model"] = env["GUIDED_AB_MODAL_MODEL"]
    if env.get("GUIDED_AB_MODAL_SERVER_ARGS"):
        data["server_args"] = shlex.split(env["GUIDED_AB_MODAL_SERVER_ARGS"])
    if env.get("GUIDED_AB_MODAL_REVISION"):
        modal_data["revision"] = env["GUIDED_AB_MODAL_REVISION"]
    if env.get("GUIDED_AB_MODAL_MAX_MODEL_LEN"):
        modal_data["max_model_len"] = int(env["GUIDED_AB_MODAL_MAX_MODEL_LEN"])
    if env.get("GUIDED_AB_MODAL_GPU"):
        modal_data["gpu"] = env["GUIDED_AB_MODAL_GPU"]
    if env.get("GUIDED_AB_MODAL_GPU_COUNT"):
        modal_data["gpu_count"] = int(env["GUIDED_AB_MODAL_GPU_COUNT"])
    for var, field in (("GUIDED_AB_MODAL_MIN_CONTAINERS", "min_containers"), ("GUIDED_AB_MODAL_MAX_CONTAINERS", "max_containers"),
                       ("GUIDED_AB_MODAL_TARGET_INPUTS", "target_inputs")):
        if env.get(var):
            modal_data["replicas"][field] = int(env[var])
    return Arm.model_validate(data)


# -- the server command (runs in the container) ------------------------------------------------
def modal_extra_args(arm: Arm) -> list[str]:
    """The Modal target's own flags, passed as server_args' `extra` (the arm's args still win)."""
    s = arm.modal
    extra: list[str] = []
    if s.revision:
        extra += ["--revision", s.revision]
    if s.max_model_len:
        extra += ["--max-model-len", str(s.max_model_len)]
    if s.gpu_count > 1:
        extra += ["--tensor-parallel-size", str(s.gpu_count)]
    return extra


def container_command(arm: Arm, python: str | None = None, *, cli: bool | None = None) -> list[str]:
    """The vLLM server command line of this arm inside the container: `vllm serve` (as Modal's
    own vLLM example), by the container's Python; the deprecated module only if `vllm serve` is missing."""
    return [
        *server_command(python or sys.executable, cli=cli_works_here() if cli is None else cli),
        *server_args(arm, arm.model, host=HOST, port=PORT, extra=modal_extra_args(arm)),
    ]


def container_env(arm: Arm, environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: the container's, the key from the modal.Secret, and PYTHONPATH
    so that `--middleware guided_ab.in_server.attribution...` imports in the server process."""
    api_key = environ.get("VLLM_API_KEY")
    if not api_key:
        raise RuntimeError(
            "VLLM_API_KEY is not set in the container: the modal.Secret named in the arm's "
            "modal.api_key_secret must hold it (modal secret create guided-ab-api-key VLLM_API_KEY=...)"
        )
    env = {**environ, **server_env(arm, api_key)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, environ.get("PYTHONPATH", "")) if p)
    return env


def serve() -> None:
    """Start vLLM in the background; Modal routes requests once port 8000 answers."""
    spec = ArmSpec.from_environment(os.environ)
    cmd = container_command(spec.arm)
    print("guided-ab: starting", shlex.join(cmd), flush=True)
    subprocess.Popen(cmd, env=container_env(spec.arm, os.environ))


_serve_impl = serve  # the plain function every arm's app wraps (its qualified name stays "serve")


# -- the Modal app (described on the deploying machine and again in the container) -------------
def build_image(spec: ArmSpec) -> modal.Image:
    """CUDA + pinned vLLM (shared, cached layers), then this arm's ENV layer, then our sources."""
    return (
        modal.Image.from_registry(CUDA_BASE_IMAGE, add_python=PYTHON_VERSION)
        .entrypoint([])
        .uv_pip_install(f"vllm=={VLLM_VERSION}")
        .env({"HF_XET_HIGH_PERFORMANCE": "1", **spec.environment()})
        .add_local_python_source("guided_ab")
    )


def build_arm_app(spec: ArmSpec) -> tuple[modal.App, modal.Function]:
    """The app of one arm and its web function: vLLM's server on port 8000 of GPU containers
    (one by default; `modal.replicas` lets Modal's autoscaler run more, each its own vLLM server)."""
    s, replicas = spec.arm.modal, spec.replicas
    app = modal.App(
        spec.app_name,
        tags={"guided-ab-arm": spec.arm.name, "guided-ab-backend": spec.arm.backend, **(spec.tags or {})},
    )
    web = modal.web_server(port=PORT, startup_timeout=s.startup_timeout_s)(_serve_impl)
    function: modal.Function = app.function(
        image=build_image(spec),
        gpu=f"{s.gpu}:{s.gpu_count}",
        volumes={
            HF_CACHE_DIR: modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True),
            VLLM_CACHE_DIR: modal.Volume.from_name(VLLM_CACHE_VOLUME, create_if_missing=True),
        },
        secrets=[modal.Secret.from_name(s.api_key_secret, required_keys=[] if spec.run_key_secret else ["VLLM_API_KEY"]),
                 *([modal.Secret.from_name(spec.run_key_secret, required_keys=["VLLM_API_KEY"])] if spec.run_key_secret else [])],
        cpu=s.cpu,
        memory=s.memory_gib * 1024,  # MiB
        min_containers=replicas.min_containers,
        max_containers=replicas.max_containers,
        scaledown_window=s.scaledown_window_s,
        startup_timeout=s.startup_timeout_s,
        timeout=REQUEST_TIMEOUT_S,
    )(modal.concurrent(max_inputs=s.max_concurrent_inputs, target_inputs=replicas.target_inputs)(web))
    return app, function


def build_app(spec: ArmSpec) -> modal.App:
    """The app of one arm (what the Modal target deploys under spec.app_name)."""
    return build_arm_app(spec)[0]


# What `modal deploy -m modal_apps.vllm_arm` deploys, and what a container rebuilds on import
# from the environment baked into its image; the container finds its function as `serve`.
SPEC = ArmSpec.from_environment(os.environ)
# (mypy: the name `serve` is first the plain function, whose qualified name Modal keeps, then its Function)
app, serve = build_arm_app(SPEC)  # type: ignore[assignment]  # noqa: F811 - `serve` becomes the Modal function wrapping _serve_impl
