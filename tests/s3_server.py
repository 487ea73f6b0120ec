"""A real S3 API server for the tests: moto's standalone server (as s3fs's own tests use it), one
per test session, on a free loopback port, with a bucket to write runs into.

Use it from a test module:

    import s3_server as s3
    s3_server, s3_env, s3_bucket = s3.s3_server, s3.s3_env, s3.s3_bucket  # the fixtures, by name

    def test_x(s3_bucket):            # s3_bucket: "s3://<bucket>", the environment set for s3fs
        ...

`s3_env` puts the server's endpoint and test credentials into os.environ (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...), so s3fs in this process and every subprocess the test starts (a CLI phase,
a Prefect worker) reach it; `S3Server.env()` is the same as a dict for a subprocess's env.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through s3fs (no real AWS account is touched)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                # the metadata service would be asked for credentials otherwise: never, here
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]})

    def new_bucket(self, prefix: str = "runs") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name


def start_server() -> S3Server:
    """moto's server in its own process (a subprocess, not a thread: the phases under test run
    their own event loops and threads, and a server in the test process would share its GIL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto's S3 server exited at start (status {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return S3Server(endpoint, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto's S3 server did not listen within 60 s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install 'guided-ab[test]')")
    server = start_server()
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    return s3_server


@pytest.fixture()
def s3_bucket(s3_env: S3Server) -> str:
    """A new, empty bucket on the session's server: `s3://<bucket>`."""
    return f"s3://{s3_env.new_bucket()}"
