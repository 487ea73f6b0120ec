"""A fault server in a child process (its own session), e.g. to SIGKILL it mid-run:
`spawn("healthy", api_key=k)` starts `python -m guided_ab.selfcheck.fault_server` with the key in
its environment (never on the command line) and returns once it says `listening <url>`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


class FaultProcess:
    """A fault server in a child process (its own process group), e.g. to SIGKILL it mid-run."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc = proc
        self.url = url
        self.pid = proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would; returns once the process is gone."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> FaultProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(mode: str = "healthy", *, api_key: str | None = None, log_path: str | None = None,
          **options: float | int | str) -> FaultProcess:
    """Start `python -m guided_ab.selfcheck.fault_server` in its own session; the key travels in the environment."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "guided_ab.selfcheck.fault_server", "--mode", mode, "--port", "0"]
    if api_key:
        env["GUIDED_AB_FAULT_KEY"] = api_key
        cmd += ["--key-env", "GUIDED_AB_FAULT_KEY"]
    for k, v in options.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if log_path:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
    else:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    line = proc.stdout.readline().decode().strip() if proc.stdout else ""
    if not line.startswith("listening "):
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"the fault server did not start (said {line!r}); see {log_path or 'its stderr'}")
    return FaultProcess(proc, line.split(" ", 1)[1])
