"""The reaper flow stops a local vLLM server whose run crashed (its parent process is gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guided_ab.arms import local

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_reaper_flow_stops_an_orphaned_local_server(prefect_harness, tmp_path):
    try:
        local.vllm_version(local.vllm_python())
    except Exception:
        pytest.skip("vLLM is not installed for the local target (run scripts/install.sh)")
    # a "run" that starts a real vLLM server and dies without stopping it (as under SIGKILL)
    script = textwrap.dedent(f"""
        import os
        from guided_ab.config import parse_config
        from guided_ab.store import RunStore
        from guided_ab.arms import local
        cfg = parse_config({{"name": "orphan", "store": {str(tmp_path / "runs")!r}, "arms": [
            {{"name": "a", "role": "control", "backend": "xgrammar"}},
            {{"name": "b", "role": "candidate", "backend": "auto"}}]}})
        store = RunStore.create(cfg, "orphan-run")
        py = local.vllm_python()
        ep = local.start(cfg.arms[0], store, python=py, model=local.model_path(cfg.arms[0], py), version="test")
        print(ep.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert local._alive(pid) and local._is_our_server(pid), "the orphan should be a live vLLM server process"

    from flows.reaper import reaper

    stopped = reaper(older_than_s=0)
    assert any(f"pid={pid}" in s for s in stopped), stopped
    deadline = time.monotonic() + 10
    while local._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not local._alive(pid)
    assert not [r for r in local.leftovers() if r["run_id"] == "orphan-run"]
