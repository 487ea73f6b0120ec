"""Shared test fixtures: an isolated Prefect (temp PREFECT_HOME, one harness per session) and
isolated state/cache directories so tests never touch a user's ~/.prefect or ~/.local/state."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BENCH = SHARED / "jsonschemabench"
sys.path.insert(0, str(REPO))

_tmp_home = tempfile.mkdtemp(prefix="guided-ab-tests-")
os.environ["PREFECT_HOME"] = str(Path(_tmp_home) / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["GUIDED_AB_STATE_DIR"] = str(Path(_tmp_home) / "state")
# the converted model is reused across test sessions on the same machine (it is a cache)
os.environ.setdefault("GUIDED_AB_CACHE", str(Path.home() / ".cache" / "guided-ab"))

OUTPUT_DIR = REPO / "test-output"


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (SQLite) for the whole session; heartbeats off to save a second per flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture()
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """bench/loopback_server.py on a free port, one per test module: its base URL."""
    port_file = tmp_path_factory.mktemp("loopback") / "port"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "loopback_server.py"), "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 15
    while not port_file.exists():
        assert proc.poll() is None, f"loopback server exited: {proc.stderr.read().decode()[-500:]}"
        assert time.time() < deadline, "loopback server did not start within 15 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_file.read_text().strip()}"
    proc.terminate()
    proc.wait(10)
