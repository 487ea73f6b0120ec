"""What every target (local, modal, external) hands the rest of the pipeline: an Endpoint.

API keys never enter the run store: an Endpoint names where its key lives (`key_ref`), and the
key itself is read only when a request is sent. Per-run keys of local servers live in the
state directory (outside the run store) with mode 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import BaseModel

from guided_ab.config import ConfigError


def state_dir() -> Path:
    """Where keys and the records of started servers live (for `guided-ab reap`)."""
    d = Path(os.environ.get("GUIDED_AB_STATE_DIR") or Path.home() / ".local" / "state" / "guided-ab")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Endpoint(BaseModel):
    run_id: str
    arm: str
    target: str  # local | modal | external
    base_url: str  # ends before /v1
    model: str  # the model name requests must carry
    backend: str  # the configured structured-output backend
    key_ref: str | None = None  # "file:<path>" or "env:<NAME>"; None = no key
    started_at: float | None = None  # when this run started it (None: not started by this run)
    pid: int | None = None
    port: int | None = None
    app_name: str | None = None
    vllm_version: str | None = None
    log_path: str | None = None
    cost_per_hour: float = 0.0


def new_key_file(run_id: str, arm: str) -> str:
    """Create a fresh random API key for one arm of one run; returns its key_ref."""
    d = state_dir() / "keys" / run_id
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = d / arm
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("gab-" + secrets.token_urlsafe(24))
    return f"file:{p}"


def resolve_key(key_ref: str | None) -> str | None:
    if not key_ref:
        return None
    kind, _, where = key_ref.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise ConfigError(f"the API key variable {where} is not set: export it before running this phase")
        return value
    if kind == "file":
        try:
            return Path(where).read_text().strip()
        except OSError:
            raise ConfigError(f"the API key file {where} is gone: re-run the deploy phase for this run") from None
    raise ConfigError(f"unknown key reference {key_ref!r}")
