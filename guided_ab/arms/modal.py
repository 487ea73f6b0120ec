"""Modal target: each arm of a run is its own Modal app serving vLLM on GPUs.

The app is modal_apps/vllm_arm.py (image pinned to a vLLM release, HF/vLLM cache Volumes, GPU
type and count, the API key from a modal.Secret, the attribution middleware). This module
deploys it from code, finds its URL, waits through cold starts, stops it, and reaps leftovers.

Every call into Modal goes through `ModalSDK`, a thin layer of a few methods; tests replace it
with `use_sdk(fake)` and run the rest of this module for real. Nothing here imports `modal`
at module level: planning and dry runs work without the optional `modal` package.

The API key: each arm of each run has its own, derived from the team key in
GUIDED_AB_MODAL_API_KEY by the run id and arm (arms/base.py derived_key). Deploy puts it in a
modal.Secret named like the arm's app (`gab-<experiment>-<run>-<arm>`), which the container
mounts after the team's `modal.api_key_secret` (HF_TOKEN and the like stay there), so its
VLLM_API_KEY is the one vLLM checks; teardown and the reaper delete that secret with the app, so a run's key
stops working with the run. The sending side derives the same key when it sends a request
(Endpoint.key_ref = "derived:GUIDED_AB_MODAL_API_KEY:<run id>/<arm>"), on whatever machine the
phase runs: nothing but the team key has to be there, and keys never enter the store.
(Phase 3's production apps keep the team's own secret, `modal.api_key_secret`: guided_ab/promote.py.)
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from guided_ab.arms.base import Endpoint, Log, StartEstimate, Target, derived_key, derived_key_ref
from guided_ab.arms.local_model import EMBEDDED_MODEL
from guided_ab.arms.ready import wait_until_ready
from guided_ab.arms.vllm_args import SERVED_MODEL_NAME
from guided_ab.config import Arm, ConfigError, ExperimentConfig, TargetKind
from guided_ab.errors import ModalNotReady
from guided_ab.errors import ModalTargetError as ModalTargetError  # defined here before guided_ab.errors

if TYPE_CHECKING:
    from guided_ab.store import RunStore

API_KEY_ENV = "GUIDED_AB_MODAL_API_KEY"
APP_PREFIX = "gab-"  # every app this pipeline deploys; the reaper only ever touches these
FUNCTION_NAME = "serve"  # keep in sync with modal_apps.vllm_arm.FUNCTION_NAME
MAX_APP_NAME = 64  # Modal's limit for object names
LIVE_STATES = ("deployed", "initializing", "ephemeral", "detached")
# App tags (modal.App(tags=...)): what the reaper and Modal's billing report by tag read
PROJECT_TAG, RUN_TAG, ARM_TAG = "guided-ab-project", "guided-ab-run", "guided-ab-arm"
PROJECT = "guided-ab"


@dataclass(frozen=True)
class AppSummary:
    """One Modal app as the reaper sees it."""

    name: str
    created_at: float  # unix seconds
    state: str  # modal.types.AppState value: deployed, stopped, stopping, initializing, ...

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


# -- the thin Modal SDK layer ------------------------------------------------------------------
class ModalSDK:
    """The only code that talks to Modal (modal>=1.6 Python SDK; no CLI)."""

    def __init__(self, environment_name: str | None = None):
        self.environment_name = environment_name or os.environ.get("MODAL_ENVIRONMENT") or None

    def has_credentials(self) -> bool:
        """Is a Modal token configured here (environment or ~/.modal.toml)? No network."""
        from modal.config import config

        return bool(config.get("token_id") and config.get("token_secret"))

    def deploy_app(self, app: Any, name: str) -> str:
        """Deploy (or redeploy) `app` under `name`; the web URL of its `serve` function."""
        import modal

        if os.environ.get("GUIDED_AB_MODAL_OUTPUT"):
            with modal.enable_output():
                app.deploy(name=name, environment_name=self.environment_name)
        else:
            app.deploy(name=name, environment_name=self.environment_name)
        url = self.web_url(name)
        if not url:
            raise ModalTargetError(f"Modal app {name!r} was deployed but its function {FUNCTION_NAME!r} has no web URL")
        return url

    def web_url(self, name: str) -> str | None:
        """The URL of a deployed app's `serve` function; None if there is no such app."""
        import modal
        from modal.exception import NotFoundError

        try:
            return modal.Function.from_name(name, FUNCTION_NAME, environment_name=self.environment_name).get_web_url()
        except NotFoundError:
            return None

    def find_app(self, name: str) -> AppSummary | None:
        """The deployed app of that name, or None when none is deployed (never deployed or stopped)."""
        import modal
        from modal.exception import NotFoundError

        try:
            app = modal.App.lookup(name, environment_name=self.environment_name)
            info = app.info(refresh=True)
        except NotFoundError:
            return None
        return AppSummary(name, info.lifecycle.created_at.timestamp(), _state(info.lifecycle.state))

    def put_secret(self, name: str, values: dict[str, str]) -> None:
        """Create the named modal.Secret with `values`, or overwrite them if it exists."""
        import modal
        from modal.exception import AlreadyExistsError

        try:
            modal.Secret.objects.create(name, values, environment_name=self.environment_name)
        except AlreadyExistsError:
            modal.Secret.from_name(name, environment_name=self.environment_name).update(values)

    def delete_secret(self, name: str) -> None:
        """Delete the named modal.Secret; nothing if there is none."""
        import modal

        modal.Secret.objects.delete(name, allow_missing=True, environment_name=self.environment_name)

    def stop_app(self, name: str) -> bool:
        """Stop the deployed app of that name. False if there was none (already stopped or never deployed)."""
        import modal
        from modal.exception import NotFoundError

        try:
            app = modal.App.lookup(name, environment_name=self.environment_name)
            if _state(app.info(refresh=True).lifecycle.state) in ("stopped", "stopping", "disabled"):
                return False
            app.stop()
        except NotFoundError:
            return False
        return True

    def app_tags(self, name: str) -> dict[str, str]:
        """The tags of the deployed app of that name ({} if there is none)."""
        import modal
        from modal.exception import NotFoundError

        try:
            return dict(modal.App.lookup(name, environment_name=self.environment_name).get_tags())
        except NotFoundError:
            return {}

    def billing_report(self, start: float, end: float, tag_names: list[str]) -> list[dict[str, Any]]:
        """Modal's hourly cost report of the environment over [start, end) (unix seconds), one row
        per object and hour: {"object_id", "description", "hour", "cost", "cost_by_resource", "tags"}.
        Modal leaves out a partial last hour."""
        import datetime as dt

        import modal

        env = (
            modal.Environment.from_name(self.environment_name)
            if self.environment_name else modal.Environment.from_context()
        )
        utc = dt.UTC
        items = env.billing.report(start=dt.datetime.fromtimestamp(start, utc), end=dt.datetime.fromtimestamp(end, utc),
                                   resolution="h", tag_names=tag_names)
        return [{
            "object_id": i.object_id, "description": i.description, "hour": i.interval_start.timestamp(),
            "cost": float(i.cost), "cost_by_resource": {k: float(v) for k, v in i.cost_by_resource.items()},
            "tags": dict(i.tags),
        } for i in items]

    def list_apps(self) -> list[AppSummary]:
        """The live apps of the environment (Modal lists stopped ones for a while too; they are left out)."""
        import modal

        env = (
            modal.Environment.from_name(self.environment_name)
            if self.environment_name else modal.Environment.from_context()
        )
        out = []
        for app in env.apps.list():
            info = app.info()  # filled in by the listing, no extra call
            out.append(AppSummary(app.name or "", info.lifecycle.created_at.timestamp(), _state(info.lifecycle.state)))
        return out


def _state(state: Any) -> str:
    return str(getattr(state, "value", state)).lower()


_sdk: Any = None


def sdk() -> ModalSDK:
    """The SDK layer in use (created on first use)."""
    global _sdk
    if _sdk is None:
        _sdk = ModalSDK()
    return _sdk


@contextmanager
def use_sdk(replacement: Any) -> Iterator[Any]:
    """Use another object with ModalSDK's methods (a fake, in tests) inside the block."""
    global _sdk
    before, _sdk = _sdk, replacement
    try:
        yield replacement
    finally:
        _sdk = before


# -- names and cost ----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def _short_hash(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def run_prefix(experiment: str, run_id: str) -> str:
    """The common start of the app names of one run (all its arms): `gab-<experiment>-<run>-`."""
    exp = _slug(experiment)[:20].strip("-") or "exp"
    run = _slug(run_id.removeprefix(f"{experiment}-")) or _short_hash(run_id, 8)
    if len(run) > 21:
        run = f"{run[:12].strip('-')}-{_short_hash(run_id, 8)}"
    return f"{APP_PREFIX}{exp}-{run}-"


def app_name(experiment: str, arm: str, run_id: str) -> str:
    """The Modal app name of one arm of one run: `gab-<experiment>-<run>-<arm>`, at most 64 characters.

    Lowercase letters, digits and dashes only (it becomes part of the web URL). Long parts are
    shortened with a hash, so names stay distinct per (experiment, run, arm).
    """
    prefix = run_prefix(experiment, run_id)
    room = MAX_APP_NAME - len(prefix)
    part = _slug(arm) or "arm"
    if len(part) > room:
        part = f"{part[: room - 5].strip('-')}-{_short_hash(arm, 4)}"
    return prefix + part


def cost_per_hour(arm: Arm) -> float:
    """USD per hour while the arm's app is held (warm from deploy to teardown): GPUs, CPU, memory
    of each warm container (replicas.min_containers, at least one). Containers the autoscaler adds
    under load are not foreseeable here: `guided-ab cost --run-id` shows what Modal billed."""
    return arm.modal.warm_cost_per_hour


def replicas_line(arm: Arm) -> str:
    """How many containers serve the arm, and what that costs (the dry run's description)."""
    s = arm.modal
    r = s.replicas
    warm = (f"{r.min_containers} held warm from deploy to teardown (min_containers)" if r.min_containers
            else "none held warm (min_containers=0: scales to zero when idle; one counted while the arm is held)")
    if r.max_containers == s.warm_containers:
        return f"    containers: {warm}, at most {r.max_containers} (max_containers): no autoscaling"
    target = f", autoscaler target {r.target_inputs} inputs per container" if r.target_inputs else ""
    return (f"    containers: {warm}, up to {r.max_containers} under load (max_containers{target}): "
            f"${s.warm_cost_per_hour:.2f}/h counted, up to ${s.max_cost_per_hour:.2f}/h with all {r.max_containers} up")


def tag_value(text: str) -> str:
    """`text` as a valid Modal tag value (letters, digits, '-', '.', '_'; at most 63 characters)."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", text)
    return value if len(value) <= 63 else f"{value[:54]}-{_short_hash(text, 8)}"


def app_tags(run_id: str, arm: str) -> dict[str, str]:
    """The tags every app of this pipeline carries (the backend is added by the app itself)."""
    return {PROJECT_TAG: PROJECT, RUN_TAG: tag_value(run_id), ARM_TAG: tag_value(arm)}


def _experiment_name(store: RunStore) -> str:
    try:
        return store.load_config().name
    except (ConfigError, OSError):
        return store.run_id


# -- deploy / wait / stop / reap ---------------------------------------------------------------
def check_arm(arm: Arm) -> None:
    """Refuse a Modal arm that could not work, before anything is paid for."""
    if arm.target != "modal":
        raise ConfigError(f"arm '{arm.name}': target is {arm.target!r}, not 'modal'")
    if arm.model == EMBEDDED_MODEL:
        raise ConfigError(
            f"arm '{arm.name}': model {arm.model!r} is not a Hugging Face model id; a Modal arm downloads "
            "its model in the container, e.g. model: Qwen/Qwen2.5-0.5B-Instruct"
        )
    if not os.environ.get(API_KEY_ENV):
        raise ConfigError(
            f"arm '{arm.name}': export {API_KEY_ENV}, the team's key (each run's arms get keys derived from it; "
            f"production apps use it as VLLM_API_KEY in the Modal secret '{arm.modal.api_key_secret}': "
            f"modal secret create {arm.modal.api_key_secret} VLLM_API_KEY=...), or keep it in the Prefect Secret "
            "block guided-ab-modal-api-key"
        )


def run_key_scope(run_id: str, arm: str) -> str:
    """What an arm's per-run key is derived for."""
    return f"{run_id}/{arm}"


def run_secret_name(app: str) -> str:
    """The modal.Secret holding an arm's per-run key: named like its app (which names the run)."""
    return app


def deploy(arm: Arm, store: RunStore) -> Endpoint:
    """Deploy the arm's app (or reuse it if this run already deployed it); returns without waiting.

    Idempotent: a re-run of the deploy phase for the same run finds the app by name and reuses
    it (same URL, held since its creation) instead of deploying it again.
    """
    check_arm(arm)
    from modal_apps.vllm_arm import VLLM_VERSION, ArmSpec, build_app

    name = app_name(_experiment_name(store), arm.name, store.run_id)
    layer = sdk()
    try:
        existing = layer.find_app(name)
        url = layer.web_url(name) if existing and existing.live else None
        if url and existing:
            started = existing.created_at
        else:
            started = time.time()
            # the run's own key, in a secret named by the run, mounted after the team's (whose
            # VLLM_API_KEY it overrides; its HF_TOKEN still reaches the container)
            key = derived_key(os.environ[API_KEY_ENV], run_key_scope(store.run_id, arm.name))
            layer.put_secret(run_secret_name(name), {"VLLM_API_KEY": key})
            spec = ArmSpec(arm=arm, app_name=name, tags=app_tags(store.run_id, arm.name), run_key_secret=run_secret_name(name))
            url = layer.deploy_app(build_app(spec), name)
    except (ModalTargetError, ConfigError):
        raise
    except Exception as err:  # the SDK's errors (auth, build, quota) carry their own detail
        raise ModalTargetError(
            f"deploying arm '{arm.name}' as Modal app {name!r} failed: {type(err).__name__}: {err} "
            "(check `modal token info`, the secret, and the GPU type)",
            transient=_network_blip(err),
        ) from err
    return Endpoint(
        run_id=store.run_id, arm=arm.name, target="modal", base_url=url.rstrip("/").removesuffix("/v1"),
        model=SERVED_MODEL_NAME, backend=arm.backend, key_ref=derived_key_ref(API_KEY_ENV, run_key_scope(store.run_id, arm.name)),
        started_at=started, app_name=name, vllm_version=VLLM_VERSION, cost_per_hour=cost_per_hour(arm),
    )


def _network_blip(err: BaseException) -> bool:
    """Did a call into Modal fail on the way (a dropped connection, a timeout), not on its merits?"""
    if isinstance(err, ConnectionError | TimeoutError | httpx.TransportError):
        return True
    modal_exc = sys.modules.get("modal.exception")  # only if the SDK is loaded: never import it for this
    return modal_exc is not None and isinstance(err, modal_exc.ConnectionError | modal_exc.TimeoutError)


def wait_ready(ep: Endpoint, deadline_s: float, *, poll_s: float = 5.0, request_timeout_s: float = 30.0) -> float:
    """Poll GET /health until 200; seconds waited. ModalNotReady (a transient ModalTargetError) at the deadline.

    A scaled-to-zero Modal app answers 503 (or holds the request, or drops the connection)
    while its container starts and vLLM loads the model: all of that means "keep waiting".
    """
    return wait_until_ready(
        ep, deadline_s, what=f"Modal app {ep.app_name!r} of arm '{ep.arm}' ({ep.base_url})", path="/health",
        send_key=False, poll_s=poll_s, request_timeout_s=request_timeout_s, not_ready=ModalNotReady,
        hint="; large models need a long start: raise server_start_timeout_s and the arm's "
        f"modal.startup_timeout_s, and see `modal app logs {ep.app_name}`",
    )


def stop(ep: Endpoint) -> bool:
    """Stop the arm's app. True if it was running; False if it was already stopped or gone."""
    if not ep.app_name:
        return False
    layer = sdk()
    stopped = layer.stop_app(ep.app_name)
    if (ep.key_ref or "").startswith("derived:"):  # the run's own secret (never the team's): its key dies with the run
        layer.delete_secret(run_secret_name(ep.app_name))
    return stopped


def reap(prefix: str = APP_PREFIX, older_than_s: float = 0.0, *, now: float | None = None,
         protect: Collection[str] = ()) -> list[str]:
    """Stop live apps whose name starts with `prefix` (always within `gab-`) and that are older
    than `older_than_s`, except apps of the runs in `protect` (runs still in progress, by their
    `guided-ab-run` tag); the names stopped. For a scheduled clean-up of crashed runs."""
    if not prefix.startswith(APP_PREFIX):
        raise ConfigError(f"reap prefix {prefix!r} must start with {APP_PREFIX!r}: only this pipeline's apps are reaped")
    now = time.time() if now is None else now
    layer = sdk()
    protected = {tag_value(r) for r in protect}
    stopped = []
    for app in layer.list_apps():
        if not (app.live and app.name.startswith(prefix) and now - app.created_at >= older_than_s):
            continue
        if protected and layer.app_tags(app.name).get(RUN_TAG) in protected:
            continue  # its run is still going: its own teardown stops it
        if layer.stop_app(app.name):
            stopped.append(app.name)
        layer.delete_secret(run_secret_name(app.name))  # the crashed run's per-run key, named like its app
    return stopped


class ModalTarget:
    """An arm served by its own Modal app (GPU containers, scaled to zero when idle)."""

    kind: TargetKind = "modal"
    shares_local_cores = False
    stop_again = False
    slow_start = True  # a first start downloads the weights into the Volume
    where_label = "app"

    def prepare(self, arm: Arm, log: Log = print) -> None:
        pass  # the container downloads its model itself

    def start(self, arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
        return deploy(arm, store)

    def start_deadline(self, cfg: ExperimentConfig, arm_name: str) -> float:
        # a large model's cold start may exceed the generic deadline
        return max(cfg.server_start_timeout_s, cfg.arm(arm_name).modal.startup_timeout_s)

    def wait(self, ep: Endpoint, deadline_s: float) -> float:
        return wait_ready(ep, deadline_s)

    def stop(self, ep: Endpoint) -> bool:
        return stop(ep)

    def reap(self, *, run_id: str | None = None, older_than_s: float = 0.0, prefix: str | None = None,
             force: bool = False, protect: Collection[str] = ()) -> list[str]:
        if not prefix:  # Modal apps are reaped only when asked for by name prefix (it needs a token)
            return []
        return [f"stopped Modal app {name}" for name in reap(prefix, older_than_s, protect=() if force else protect)]

    def estimate(self, arm: Arm, *, experiment: str, run_id: str, startup_s: Mapping[str, float]) -> StartEstimate:
        startup = startup_s.get(self.kind, 0.0)
        return StartEstimate(
            where=app_name(experiment, arm.name, run_id), gpu=f"{arm.modal.gpu} x {arm.modal.gpu_count}",
            cost_per_hour=cost_per_hour(arm), startup_s=startup,
            max_startup_s=max(startup, float(arm.modal.startup_timeout_s)) if startup else startup,
        )

    def describe(self, arm: Arm) -> list[str]:
        s = arm.modal
        return [
            f"    GPU: {s.gpu} x {s.gpu_count} (tensor parallel {s.gpu_count}), ${s.gpu_cost_per_hour:.2f} per GPU-hour",
            f"    CPU {s.cpu:g} cores, {s.memory_gib} GiB (${s.cpu * s.cpu_cost_per_core_hour + s.memory_gib * s.memory_cost_per_gib_hour:.2f}/h) "
            "per container",
            replicas_line(arm),
            f"    startup timeout {s.startup_timeout_s} s, scale-down {s.scaledown_window_s} s, "
            f"{s.max_concurrent_inputs} concurrent inputs per container",
        ]


TARGET: Target = ModalTarget()
