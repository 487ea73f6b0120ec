"""Reliability 2 (issue 17), item 8: the smaller holes, each with a test. Inputs are parsed with
bounded cost (YAML aliases, depth, sizes checked before reading), refused naming what is wrong,
and a damaged run directory gives a message, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from guided_ab.cli import app
from guided_ab.config import ConfigError, load_config, parse_config
from guided_ab.load.classify import classify
from guided_ab.load.client import chat_body, new_session, send_chat
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore, check_run_id
from guided_ab.workload import bench_directory

pytestmark = pytest.mark.timeout(120)


def _data(tmp_path: Path, **workload: object) -> dict:
    return {
        "name": "inputs", "store": str(tmp_path / "runs"),
        "arms": [{"name": "a", "role": "control", "target": "external", "backend": "guidance", "url": "http://127.0.0.1:9"},
                 {"name": "b", "role": "candidate", "target": "external", "backend": "auto", "url": "http://127.0.0.1:9"}],
        "workload": {"size": 2, "observe_size": 0, **workload},
    }


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- YAML: aliases, depth, size ------------------------------------------------------------------
def _alias_bomb(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    lines += ["name: bomb", "arms:", f"  - {{name: a, role: control, backend: *l{levels - 1}}}",
              "  - {name: b, role: candidate, backend: auto}"]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_cannot_expand_into_a_huge_value_or_message(tmp_path):
    p = _write(tmp_path, _alias_bomb(7))  # 10**7 strings once expanded
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert time.monotonic() - t0 < 5
    assert len(str(err.value)) < 2000 and str(p) in str(err.value)


def test_a_literal_error_shows_a_bounded_value(tmp_path):
    d = _data(tmp_path)
    d["arms"][0]["backend"] = ["x" * 10_000] * 1000
    with pytest.raises(ConfigError) as err:
        parse_config(d, "c")
    assert "arms.0.backend" in str(err.value) and len(str(err.value)) < 2000


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    p = _write(tmp_path, "name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)


def test_a_config_file_is_measured_before_it_is_read(tmp_path):
    p = tmp_path / "huge.yaml"
    with open(p, "wb") as f:
        f.truncate(60 * 1024 * 1024)  # sparse: costs no disk, would cost 60 MB to read
    with pytest.raises(ConfigError, match="bytes"):
        load_config(p)


# -- fields: URLs, infinite numbers, booleans, phases --------------------------------------------------
@pytest.mark.parametrize("url", ["ftp://10.0.0.5/v1", "localhost:8000", "http://", "file:///etc/passwd", "10.0.0.5:8000"])
def test_an_arm_url_must_be_http_with_a_host(tmp_path, url):
    d = _data(tmp_path)
    d["arms"][1]["url"] = url
    with pytest.raises(ConfigError, match=r"arms\.1\.url"):
        parse_config(d, "c")


@pytest.mark.parametrize("field, value", [
    ("timeout_s", float("inf")), ("timeout_s", float("nan")), ("temperature", float("nan")), ("size", True),
    ("concurrency", True), ("timeout_s", True), ("stream_share", False),
])
def test_numbers_are_finite_and_never_booleans(tmp_path, field, value):
    d = _data(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=f"workload.{field}"):
        parse_config(d, "c")


def test_infinite_decision_thresholds_and_start_timeout_are_refused(tmp_path):
    for key, value in (("server_start_timeout_s", float("inf")), ("decision", {"latency_margin": float("inf")})):
        d = {**_data(tmp_path), key: value}
        with pytest.raises(ConfigError):
            parse_config(d, "c")


@pytest.mark.parametrize("phases", [[], ["observe", "ab"], ["deploy"], ["deploy", "evaluate", "decide"], ["deploy", "ab", "ab"]])
def test_phases_must_be_what_runs(tmp_path, phases):
    with pytest.raises(ConfigError, match="phases"):
        parse_config({**_data(tmp_path), "phases": phases}, "c")
    parse_config({**_data(tmp_path), "phases": ["deploy", "ab"]}, "c")  # observe is optional


# -- run ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["abc\n", "abc\r", "", " abc", "a" * 101])
def test_run_ids_are_matched_whole(run_id):
    with pytest.raises(ConfigError, match="run id"):
        check_run_id(run_id)


def test_an_empty_run_id_is_refused_not_replaced(tmp_path):
    p = _write(tmp_path, yaml.safe_dump(_data(tmp_path)))
    r = CliRunner().invoke(app, ["run", str(p), "--run-id", "", "--dry-run"])
    assert r.exit_code == 2 and "run id" in r.output


# -- schema files: size before reading, only regular files --------------------------------------------
def test_a_schema_file_is_measured_before_it_is_read(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "ok.json").write_text(json.dumps({"type": "object"}))
    with open(suite / "huge.json", "wb") as f:
        f.truncate(60 * 1024 * 1024)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"huge.json: \d+ bytes, over"):  # its size, not its (unread) contents
        bench_directory(suite, [], 262_144)
    assert time.monotonic() - t0 < 2


def test_a_fifo_or_device_named_json_never_blocks(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    os.mkfifo(suite / "pipe.json")
    with pytest.raises(ConfigError, match="not a regular file"):
        bench_directory(suite, [], 262_144)
    (suite / "pipe.json").unlink()
    (suite / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        bench_directory(suite, [], 262_144)


# -- damaged run directories ---------------------------------------------------------------------
def _finished(tmp_path: Path, run_id: str):
    from synthetic_run import make_finished_run

    return make_finished_run(tmp_path / "runs", run_id, pairs=20)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"verdict": {"x": 1}}', '"a string"', ""])
def test_one_damaged_decision_json_never_hides_the_other_runs(tmp_path, content):
    good = _finished(tmp_path, "good-run")
    bad = _finished(tmp_path, "bad-run")
    bad.path("decision.json").write_text(content)
    r = CliRunner().invoke(app, ["runs", "--store", str(tmp_path / "runs")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "good-run" in r.output and "bad-run" in r.output
    assert good.has("decision.json")


def test_a_broken_run_config_is_named_not_a_traceback(tmp_path):
    store = _finished(tmp_path, "broken-config")
    store.path("config.yaml").write_text("name: [unclosed\n")
    for args in (["evaluate", "--run-id", "broken-config", "--store", str(tmp_path / "runs")],):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "config.yaml" in r.output, r.output
    store.path("report.html").unlink()
    r = CliRunner().invoke(app, ["report", "broken-config", "--store", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "config.yaml" in r.output, r.output


def test_a_missing_report_and_evaluation_are_named_not_a_traceback(tmp_path):
    store = _finished(tmp_path, "no-eval")
    store.path("report.html").unlink()
    store.path("evaluation.json").unlink()
    r = CliRunner().invoke(app, ["report", "no-eval", "--store", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "evaluation.json" in r.output, r.output


def test_a_damaged_endpoints_json_is_named_by_teardown(tmp_path):
    store = _finished(tmp_path, "bad-endpoints")
    for text in ("{oops", '{"a": 5}', "[1, 2]"):
        store.path("endpoints.json").write_text(text)
        r = CliRunner().invoke(app, ["teardown", "--run-id", "bad-endpoints", "--store", str(tmp_path / "runs")])
        assert r.exit_code == 2 and "endpoints.json" in r.output, (text, r.output)


# -- a redirect is not followed ------------------------------------------------------------------
def test_a_redirect_to_another_server_is_recorded_not_followed():
    key = "gab-" + secrets.token_urlsafe(16)
    with FaultServer("healthy", api_key=key) as other, FaultServer("redirect", api_key=key, redirect_to="") as srv:
        srv.redirect_to = other.url

        async def go():
            async with new_session(2) as http:
                body = chat_body("m", "p", sc.SCHEMAS["person"], name="s", temperature=0, max_tokens=16, stream=False)
                return await send_chat(http, srv.url, body, api_key=key, timeout_s=5)

        raw = asyncio.run(go())
        assert other.stats["chat"] == 0, "the redirect was followed"
    outcome, error = classify(raw, sc.SCHEMAS["person"])
    assert raw.http_status == 307 and outcome == "server_error"
    assert error and "redirect" in error and other.url in error


# -- the leak scan looks into what Prefect stores --------------------------------------------------
def test_the_leak_scan_decodes_prefect_style_result_records(tmp_path):
    import base64
    import lzma
    import pickle

    from guided_ab.selfcheck.leaks import leaked_files

    key = "gab-" + secrets.token_urlsafe(24)
    blob = pickle.dumps({"headers": {"Authorization": f"Bearer {key}"}})
    (tmp_path / "pickled").write_text(json.dumps({"metadata": {}, "result": base64.encodebytes(blob).decode()}))
    (tmp_path / "compressed").write_text(json.dumps({"metadata": {}, "result": base64.encodebytes(lzma.compress(blob)).decode()}))
    (tmp_path / "clean").write_text(json.dumps({"metadata": {}, "result": base64.encodebytes(pickle.dumps("x" * 100)).decode()}))
    assert sorted(Path(p).name for p in leaked_files(tmp_path, [key])) == ["compressed", "pickled"]


def test_store_open_refuses_a_run_id_that_would_match_with_a_newline(tmp_path):
    cfg = parse_config(_data(tmp_path), "c")
    RunStore.create(cfg, "r1")
    with pytest.raises(ConfigError, match="is not valid"):
        RunStore.open(tmp_path / "runs", "r1\n")
