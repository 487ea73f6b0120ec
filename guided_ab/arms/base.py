"""What every target (local, modal, external) is and hands the rest of the pipeline.

`Target` is the protocol each target implements (arms/local.py, arms/modal.py, arms/external.py;
arms/targets.py maps a TargetKind to its implementation), so the phases, the dry run and the
canary ask the target instead of comparing target names. `Endpoint` is what a started (or
looked-up) arm is: where it answers and how to reach it.

API keys never enter the run store: an Endpoint names where its key lives (`key_ref`), and the
key itself is read only when a request is sent. Per-run keys of local servers live in the
state directory (outside the run store) with mode 0600. Per-run keys of remote servers (Modal
arms) are derived from a team key by the run id (`derived_key`): a phase on any machine that
has the team key finds the run's key, and nothing has to travel with the run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from guided_ab.config import Arm, ConfigError, ExperimentConfig, TargetKind
from guided_ab.errors import RunStateError

if TYPE_CHECKING:  # the store imports pandas; a target only needs its type here
    from guided_ab.store import RunStore

Log = Callable[[str], None]


def state_dir() -> Path:
    """Where keys and the records of started servers live (for `guided-ab reap`)."""
    d = Path(os.environ.get("GUIDED_AB_STATE_DIR") or Path.home() / ".local" / "state" / "guided-ab")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Endpoint(BaseModel):
    run_id: str
    arm: str
    target: TargetKind
    base_url: str  # ends before /v1
    model: str  # the model name requests must carry
    backend: str  # the configured structured-output backend
    key_ref: str | None = None  # "file:<path>", "env:<NAME>" or "derived:<NAME>:<scope>"; None = no key
    started_at: float | None = None  # when this run started it (None: not started by this run)
    pid: int | None = None
    port: int | None = None
    marker: str | None = None  # local servers: in the server's environment, proves the pid is still ours (arms/identity.py)
    start_ticks: int | None = None  # local servers: the kernel's start time of the process (clock ticks since boot)
    app_name: str | None = None
    vllm_version: str | None = None
    log_path: str | None = None
    cost_per_hour: float = 0.0
    # machine-local servers (local arms): the machine that started them, which alone can reach and
    # stop them (arms/targets.py refuses a phase for them elsewhere); None for remote endpoints
    host: str | None = None


def new_key_file(run_id: str, arm: str) -> str:
    """Create a fresh random API key for one arm of one run; returns its key_ref."""
    d = state_dir() / "keys" / run_id
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = d / arm
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("gab-" + secrets.token_urlsafe(24))
    return f"file:{p}"


def derived_key(team_key: str, scope: str) -> str:
    """The key of one scope (`<run id>/<arm>`) derived from a team's key: HMAC-SHA256 (the
    standard library's; one HKDF-expand block), so knowing a run's key tells nothing of the team
    key or of another run's key, and every machine with the team key derives the same one."""
    digest = hmac.new(team_key.encode(), f"guided-ab/{scope}".encode(), hashlib.sha256).digest()
    return "gab-" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def derived_key_ref(team_key_env: str, scope: str) -> str:
    """key_ref of a key derived from the team key in variable `team_key_env` for `scope`."""
    return f"derived:{team_key_env}:{scope}"


def resolve_key(key_ref: str | None) -> str | None:
    if not key_ref:
        return None
    kind, _, where = key_ref.partition(":")
    if kind == "derived":  # "derived:<TEAM_KEY_VARIABLE>:<run id>/<arm>"
        env, _, scope = where.partition(":")
        if env and scope:
            return derived_key(resolve_key(f"env:{env}") or "", scope)  # an unset variable: ConfigError
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise ConfigError(f"the API key variable {where} is not set: export it before running this phase")
        return value
    if kind == "file":
        try:
            return Path(where).read_text().strip()
        except OSError:
            raise RunStateError(f"the API key file {where} is gone: re-run the deploy phase for this run") from None
    raise RunStateError(f"unknown key reference {key_ref!r} in the run's endpoints.json: re-run the deploy phase")


@dataclass(frozen=True)
class StartEstimate:
    """What the dry run shows of one arm on its target, before anything is started."""

    where: str  # Modal app name, external URL, or "this machine"
    gpu: str  # "H100 x 4" or "-"
    cost_per_hour: float  # USD per hour the arm is held
    startup_s: float  # assumed start-up time (0 when this run starts nothing)
    max_startup_s: float  # the longest start-up the target allows before it fails


class Target(Protocol):
    """Where an arm is served. One implementation per TargetKind; `targets.target_for(kind)` finds it.

    Adding a target = one class implementing this (and its TargetKind in config.py, and a row
    in targets.py); nothing else compares target names.
    """

    kind: TargetKind
    # its servers run on this machine and share its cores: the deploy phase pins each to a core
    # or, when cores are short, starts them one after the other
    shares_local_cores: bool
    # a repeated teardown stops it again (cheap and certain for a local process); otherwise the
    # first teardown's entry is kept (a remote stop costs an API call and is already recorded)
    stop_again: bool
    # a first start may take its whole (long) startup timeout: the dry run shows that cost too
    slow_start: bool
    # the dry run's label for `StartEstimate.where` ("app" or "where")
    where_label: str

    def prepare(self, arm: Arm, log: Log = print) -> None:
        """What must exist before the arm can start (e.g. a converted checkpoint)."""
        ...

    def start(self, arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
        """Start (or look up) the arm's endpoint; returns without waiting for it to answer."""
        ...

    def start_deadline(self, cfg: ExperimentConfig, arm_name: str) -> float:
        """Seconds the deploy phase waits for this arm to answer."""
        ...

    def wait(self, ep: Endpoint, deadline_s: float) -> float:
        """Wait until the endpoint answers; seconds waited. ArmNotReady (transient) at the deadline."""
        ...

    def stop(self, ep: Endpoint) -> bool:
        """Stop what this run started; True if something was running. Tolerates a stopped endpoint."""
        ...

    def reap(self, *, run_id: str | None = None, older_than_s: float = 0.0, prefix: str | None = None,
             force: bool = False, protect: Collection[str] = ()) -> list[str]:
        """Stop what crashed runs left behind on this target, never what a run in `protect` (run
        ids of runs still in progress) holds unless `force`; one line per thing stopped."""
        ...

    def estimate(self, arm: Arm, *, experiment: str, run_id: str, startup_s: Mapping[str, float]) -> StartEstimate:
        """The dry run's view of the arm. `startup_s`: assumed start-up per TargetKind (absent: nothing starts)."""
        ...

    def describe(self, arm: Arm) -> list[str]:
        """Extra lines the dry run prints under the arm (e.g. GPU and timeouts)."""
        ...
