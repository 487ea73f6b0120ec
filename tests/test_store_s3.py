"""The run store on S3 (`store: s3://bucket/prefix`), against a real S3 API server (moto's, started
once per session by tests/s3_server.py): a whole experiment with loopback arms, a phase SIGKILLed
while it uploads journal parts and resumed, and the bad stores that must stop a command with exit 2
before anything starts (naming the URL)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import s3_server as s3
from sigkill_mid_phase import sigkill_once_recorded
from typer.testing import CliRunner

from guided_ab import phases
from guided_ab.cli import app
from guided_ab.config import ConfigError, parse_config
from guided_ab.errors import PhaseLocked
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

pytestmark = pytest.mark.distributed
# the S3 server's fixtures, by name (tests/s3_server.py)
s3_server, s3_env, s3_bucket = s3.s3_server, s3.s3_env, s3.s3_bucket
S3Server, free_port = s3.S3Server, s3.free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-s3-store-0123456789"


def _config(store: str, url: str, size: int = 12, phase_list: tuple[str, ...] = ("deploy", "observe", "ab")) -> dict:
    arm = {"target": "external", "url": url, "api_key_env": "S3_TEST_KEY", "model": "guided-ab-model"}
    return {
        "name": "s3run", "store": store, "phases": list(phase_list),
        "arms": [{"name": "control", "role": "control", "backend": "guidance", **arm},
                 {"name": "cand", "role": "candidate", "backend": "auto", **arm}],
        "workload": {"size": size, "observe_size": 2, "warmup": 1, "concurrency": 2, "timeout_s": 20},
        "decision": {"bootstrap_resamples": 200},
    }


def _objects(server: S3Server, bucket_url: str) -> list[str]:
    bucket = bucket_url.removeprefix("s3://")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _exactly_once(store: RunStore, phase: str) -> None:
    plan = phases.build_plans(store.load_config(), store)[phase]
    ids = [r.request_id for r in store.journal(phase)]
    assert ids and Counter(ids).most_common(1)[0][1] == 1, "a request was recorded twice"
    assert sorted(ids) == sorted(r.request_id for r in plan.requests), "every planned request has its one record"
    sent = store.sent_counts(phase)
    assert set(sent) == set(ids)
    assert all(r.attempt == sent[r.request_id] for r in store.journal(phase))


def test_whole_experiment_on_s3_one_record_per_request_and_the_report_in_s3(s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_TEST_KEY", KEY)
    monkeypatch.setenv("GUIDED_AB_PART_FLUSH_S", "0.05")  # many parts: the readers must merge them
    monkeypatch.chdir(tmp_path)  # nothing of the run may land in the working directory
    root = f"{s3_bucket}/team/runs"
    with FaultServer("healthy", api_key=KEY, delay_s=0.02) as server:
        cfg = parse_config(_config(root, server.url))
        store = RunStore.create(cfg, "s3-whole")
        assert store.location == f"{root}/s3-whole"
        phases.build_plans(cfg, store)
        phases.start_endpoints(cfg, store, log=lambda m: None)
        for phase in ("observe", "ab"):
            phases.run_requests(cfg, store, phase)
        phases.teardown(store, log=lambda m: None)
    phases.evaluate_run(store)
    decision = phases.decide_run(store)

    again = RunStore.open(root, "s3-whole")  # a fresh reader, as another worker would be
    for phase in ("observe", "ab"):
        _exactly_once(again, phase)
        assert len(again.records((phase,))) == len(again.journal(phase))
    keys = _objects(s3_env, s3_bucket)
    run = "team/runs/s3-whole/"
    for name in ("config.yaml", "store.json", "plan-ab.json", "endpoints.json", "records/ab.parquet", "evaluation.json",
                 "decision.json", "report.md", "report.html", "teardown.json"):
        assert run + name in keys, name
    parts = [k for k in keys if k.startswith(run + "records/ab.parts/") and not k.endswith(".manifest.json")]
    assert len(parts) > 1, "the journal was uploaded in parts while the phase ran"
    assert any(k.startswith(run + "metrics/ab/") for k in keys), "the server-metrics lines went to the store too"
    assert not any(k.endswith((".tmp", ".write-probe")) or "/.write-probe" in k for k in keys)
    assert list(tmp_path.iterdir()) == [], "the run wrote into the working directory"
    assert again.read_json("decision.json")["verdict"] == decision["verdict"]
    assert "## Why" in again.read_text("report.md")

    res = CliRunner().invoke(app, ["report", "s3-whole", "--store", root, "--html"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"{root}/s3-whole/report.html"
    res = CliRunner().invoke(app, ["runs", "--store", root])
    assert res.exit_code == 0 and "s3-whole" in res.output and decision["verdict"] in res.output, res.output


CHILD = "import sys; from guided_ab.selfcheck.faults import child_phase; child_phase(*sys.argv[1:])"


def test_sigkill_while_parts_upload_then_resume_neither_loses_nor_duplicates(s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_TEST_KEY", KEY)
    root = f"{s3_bucket}/runs"
    with FaultServer("healthy", api_key=KEY, delay_s=0.15) as server:
        cfg = parse_config(_config(root, server.url, size=40, phase_list=("deploy", "ab")))
        store = RunStore.create(cfg, "s3-kill")
        plan = phases.build_plans(cfg, store)["ab"]
        phases.start_endpoints(cfg, store, log=lambda m: None)
        # a part every 20 ms: the kill lands while parts and manifests are being uploaded
        env = {**os.environ, "GUIDED_AB_PART_FLUSH_S": "0.02"}
        cmd = [sys.executable, "-c", CHILD, root, "s3-kill", "ab"]
        killed_at = sigkill_once_recorded(cmd, env, store, "ab", at_least=10)
        assert 10 <= killed_at < len(plan.requests)

        # the lock object names a dead pid on this host: the resume takes it over at once
        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    _exactly_once(store, "ab")
    df = store.finalized_records("ab")
    assert df is not None and sorted(df.request_id) == sorted(r.request_id for r in plan.requests)
    assert not store.has("records/ab.lock"), "the lock was released"


def test_readers_merge_writers_keep_the_highest_attempt_and_ignore_a_part_no_manifest_names(s3_env, s3_bucket):
    """What a crash between a part and its manifest leaves (an orphan part) is not read; two writers'
    records of one request (a lock that failed) are one record, the highest attempt."""
    import orjson

    from guided_ab.records import RequestRecord
    from guided_ab.storage_object import _PartWriter

    store = RunStore.create(parse_config(_config(f"{s3_bucket}/r", "http://127.0.0.1:1")), "merge")

    def line(request_id: str, attempt: int) -> bytes:
        rec = RequestRecord(run_id="merge", phase="ab", arm="a", request_id=request_id, schema_id="s", subset="x",
                            order_index=0, pair_index=0, warmup=False, first_for_schema=True, stream=True,
                            attempt=attempt, sent_at=0.0, outcome="success")
        return rec.model_dump_json().encode()

    first, second = _PartWriter(store, "ab"), _PartWriter(store, "ab")  # type: ignore[arg-type]
    first.write(["r1", "r2"], [line("r1", 1), line("r2", 1)])
    first.write(["r3"], [])  # sent, never recorded (killed in flight)
    second.write(["r2", "r3"], [line("r2", 2), line("r3", 1)])
    orphan = f"{store._parts_dir('ab')}/{second.id}-000099.json"  # uploaded, its manifest never updated
    store.fs.pipe_file(orphan, b'{"sent": ["r4"], "records": [' + line("r4", 1) + b"]}")

    by_id = {r.request_id: r.attempt for r in store.journal("ab")}
    assert by_id == {"r1": 1, "r2": 2, "r3": 1}
    assert store.sent_counts("ab") == Counter({"r1": 1, "r2": 2, "r3": 2})
    assert store.recorded_ids("ab") == {"r1", "r2", "r3"}
    store.finalize_records("ab")
    assert sorted(store.records(("ab",)).request_id) == ["r1", "r2", "r3"]
    second.write([], [line("r4", 1)])  # a resumed phase adds a part: the parquet is stale, the parts are read
    assert sorted(store.records(("ab",)).request_id) == ["r1", "r2", "r3", "r4"]
    assert orjson.loads(store.read_bytes("records/ab.parquet.json"))["parts"]


def test_server_metrics_of_a_phase_that_never_scraped_read_as_none(s3_env, s3_bucket):
    """An evaluate on another worker reads every phase's scrapes: a phase with none (observe not run,
    metrics off) is empty, not an error (found when evaluate ran on a worker of its own)."""
    from guided_ab.load.server_metrics import phase_time_split

    store = RunStore.create(parse_config(_config(f"{s3_bucket}/r", "http://127.0.0.1:1")), "no-scrapes")
    assert store.metric_scrapes("observe") == {}
    assert phase_time_split(store, "observe") == phase_time_split(RunStore.open(f"{s3_bucket}/r", "no-scrapes"), "ab")
    store.append_metric_scrape("ab", "a", {"t": 1.0, "arm": "a", "values": {}})
    assert list(RunStore.open(f"{s3_bucket}/r", "no-scrapes").metric_scrapes("ab")) == ["a"]


def test_a_second_writer_of_a_phase_is_refused_naming_the_holder(s3_env, s3_bucket):
    with FaultServer("healthy", api_key=KEY) as server:
        store = RunStore.create(parse_config(_config(f"{s3_bucket}/r", server.url)), "locked")
    other = RunStore.open(f"{s3_bucket}/r", "locked")
    with store.phase_lock("ab"):
        with pytest.raises(PhaseLocked, match=rf"pid {os.getpid()} on .*one writer per phase"):
            with other.phase_lock("ab"):
                pass
    with other.phase_lock("ab"):  # released: the next writer gets it
        pass


def _evaluate(store: str, run_id: str = "any-run"):
    return CliRunner().invoke(app, ["evaluate", "--run-id", run_id, "--store", store])


def test_bad_stores_exit_2_naming_the_url(s3_env, s3_bucket, tmp_path, monkeypatch):
    res = _evaluate("s3://no-such-bucket-here/runs")
    assert res.exit_code == 2 and "s3://no-such-bucket-here/runs" in res.output and "bucket does not exist" in res.output, res.output

    # a whole run: refused before Prefect or any arm starts
    import yaml

    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(_config("s3://no-such-bucket-here/runs", "http://127.0.0.1:1")))
    res = CliRunner().invoke(app, ["run", str(cfg_path)])
    assert res.exit_code == 2 and "s3://no-such-bucket-here/runs" in res.output and "bucket does not exist" in res.output, res.output

    res = _evaluate("ftp://host/runs")
    assert res.exit_code == 2 and "ftp://host/runs" in res.output and "unknown scheme" in res.output, res.output

    if "gcsfs" not in sys.modules:
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            res = _evaluate("gs://bucket/runs")
            assert res.exit_code == 2 and "pip install 'guided-ab[gcs]'" in res.output, res.output

    # an S3 endpoint nobody listens on
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", os.environ["AWS_ENDPOINT_URL"])
    t0 = time.monotonic()
    res = _evaluate(f"{s3_bucket}/runs")
    assert res.exit_code == 2 and s3_bucket in res.output and "cannot be reached" in res.output, res.output
    assert time.monotonic() - t0 < 60

    # no credentials anywhere
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    res = _evaluate(f"{s3_bucket}/runs")
    assert res.exit_code == 2 and s3_bucket in res.output and "credentials" in res.output, res.output


def test_a_bucket_without_write_permission_is_refused_before_anything_starts(tmp_path):
    """A second server that enforces IAM after its set-up calls: a user who may only read."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin", "region_name": "us-east-1"}
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint, **admin).create_bucket(Bucket="readonly")  # 1
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, **admin)
        iam.create_user(UserName="reader")  # 2
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=(  # 3
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],'
            ' "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # 4
        run_env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                   "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in run_env}
        os.environ.update(run_env)
        try:
            cfg = parse_config(_config("s3://readonly/runs", "http://127.0.0.1:1"))
            with pytest.raises(ConfigError, match=r"store s3://readonly/runs: cannot write and delete a probe object: permission denied"):
                RunStore.create(cfg, "denied")
            res = _evaluate("s3://readonly/runs")
            assert res.exit_code == 2 and "s3://readonly/runs" in res.output and "permission denied" in res.output, res.output
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_written_by_a_newer_version_is_refused(where, s3_env, s3_bucket, tmp_path):
    root = str(tmp_path / "runs") if where == "local" else f"{s3_bucket}/runs"
    store = RunStore.create(parse_config(_config(root, "http://127.0.0.1:1")), "from-the-future")
    assert store.read_json("store.json")["format"] == 1
    store.write_json("store.json", {"format": 99, "layout": "something new"})
    with pytest.raises(ConfigError, match=r"written by a newer guided-ab \(store format 99; this version reads up to 1\)"):
        RunStore.open(root, "from-the-future")
    res = _evaluate(root, "from-the-future")
    assert res.exit_code == 2 and "newer guided-ab" in res.output, res.output
