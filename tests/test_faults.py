"""Faults survived and bad inputs refused, on loopback only (guided_ab.selfcheck.fault_server).

Each selfcheck scenario runs here as one test through the real pipeline code (see
guided_ab/selfcheck/scenarios.py for what each checks: exactly one record per planned request, the right
outcome class per arm, a resumable phase, endpoints torn down). The tests below them pin the
fault server's classes one by one, through the pipeline's HTTP client (load.client.send_chat).
"""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest
from jsonschema import Draft202012Validator
from synthetic_run import writable_record

from guided_ab.arms.vllm_args import ATTRIBUTION_HEADER
from guided_ab.config import ConfigError
from guided_ab.load.classify import classify
from guided_ab.load.client import chat_body, new_session, send_chat
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.fault_server import MODES, FaultServer, minimal_instance, spawn
from guided_ab.workload import check_schema

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    key = "gab-test-" + secrets.token_urlsafe(18)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    yield sb
    assert sc.leaked_files(sb.root, [key]) == [], "the API key was written by the run"


def _run(sandbox, fn):
    result = sc.run_scenario(sandbox, fn.__name__, "test", fn)
    assert result.held, result.detail
    assert result.lost == 0 and result.duplicates == 0
    return result.detail


# -- every selfcheck scenario is a test ----------------------------------------------------------
@pytest.mark.parametrize("name, fn", sc.FAULTS + sc.SECURITY, ids=[n for n, _ in sc.FAULTS + sc.SECURITY])
def test_fault_scenario_holds(sandbox, name, fn):
    _run(sandbox, fn)


@pytest.mark.parametrize("name, fn", sc.BAD_INPUTS, ids=[n for n, _ in sc.BAD_INPUTS])
def test_bad_input_is_refused_clearly(sandbox, name, fn):
    _run(sandbox, fn)


def test_a_scenario_that_does_not_hold_is_reported(sandbox):
    def broken(sb):
        sc.expect(False, "planted failure")

    def crashing(sb):
        raise KeyError("boom")

    def escaping(sb):
        (sb.root / "outside.txt").write_text("x")
        return "wrote outside"

    assert sc.run_scenario(sandbox, "b", "fault", broken).detail == "planted failure"
    r = sc.run_scenario(sandbox, "c", "fault", crashing)
    assert not r.held and "KeyError" in r.detail
    r = sc.run_scenario(sandbox, "e", "bad_input", escaping)
    assert not r.held and "outside" in r.detail


# -- the fault server, class by class ------------------------------------------------------------
SCHEMA = sc.SCHEMAS["person"]
EXPECTED = {
    "healthy": "success", "storm": "server_error", "stall": "timeout", "reset": "connection_error",
    "malformed_sse": "invalid_json", "cut_sse": "connection_error", "non_json": "invalid_json",
    "trickle": "success", "truncated": "truncated", "wrong": "schema_violation", "reject": "rejected",
    "garbage": "connection_error",
}


async def _each_mode(url: str, key: str) -> list[tuple[str, bool, str, object]]:
    out = []
    async with new_session(4) as http:
        for mode in MODES:
            for stream in (False, True):
                body = chat_body("m", "p", SCHEMA, name=f"case/fault-{mode}", temperature=0, max_tokens=16, stream=stream)
                raw = await send_chat(http, url, body, api_key=key, timeout_s=0.8)
                outcome, error = classify(raw, SCHEMA)
                writable_record(raw, outcome, error)
                out.append((mode, stream, outcome, raw))
    return out


def test_every_fault_mode_gets_its_class_streaming_or_not():
    with FaultServer("healthy", api_key="k", storm_requests=10**6, stall_s=5, trickle_s=0.02) as srv:
        results = asyncio.run(_each_mode(srv.url, "k"))
    for mode, stream, outcome, raw in results:
        assert outcome == EXPECTED[mode], (mode, stream, raw)
        if outcome == "success":
            assert raw.backend == "xgrammar" or raw.backend == "guidance"
            if stream:
                assert raw.ttft_s is not None and raw.ttft_s <= raw.latency_s


def test_per_request_mode_by_header_and_server_stats():
    async def go(url):
        async with httpx.AsyncClient() as http:
            r = await http.post(url + "/v1/chat/completions", headers={"x-guided-ab-fault": "reject"},
                                json=chat_body("m", "p", SCHEMA, name="s", temperature=0, max_tokens=8, stream=False))
            return r.status_code

    with FaultServer("healthy") as srv:
        assert asyncio.run(go(srv.url)) == 400
        assert srv.stats["mode:reject"] == 1


def test_storm_cold_start_then_ready():
    with FaultServer("storm", cold_start_s=1.0, storm_requests=0) as srv:
        first = httpx.get(srv.url + "/v1/models", timeout=5).status_code
        health = httpx.get(srv.url + "/health", timeout=5).status_code
        asyncio.run(asyncio.sleep(1.05))
        later = httpx.get(srv.url + "/v1/models", timeout=5).status_code
    assert (first, health, later) == (503, 503, 200)


def test_spawned_server_dies_on_sigkill_and_keeps_its_key_off_the_command_line():
    key = "gab-" + secrets.token_hex(12)
    proc = spawn("healthy", api_key=key)
    try:
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert key.encode() not in cmdline
        assert httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200
    finally:
        proc.kill()
    assert not proc.alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/health", timeout=2)


def test_attribution_header_name_matches_the_pipeline():
    from guided_ab.selfcheck import fault_server

    assert fault_server.ATTRIBUTION_HEADER == ATTRIBUTION_HEADER


@pytest.mark.parametrize("name", sorted(sc.SCHEMAS))
def test_minimal_instance_is_valid_for_the_selfcheck_schemas(name):
    schema = sc.SCHEMAS[name]
    assert Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).is_valid(minimal_instance(schema))


def test_minimal_instance_handles_refs_and_combinators():
    schema = {"$defs": {"p": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]}},
              "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                                                "c": {"type": "array", "minItems": 2, "uniqueItems": True, "items": {"type": "integer"}}},
              "required": ["a", "b", "c"]}
    assert Draft202012Validator(schema).is_valid(minimal_instance(schema))


# -- bad inputs, the pieces the scenarios rest on ---------------------------------------------------
def test_deep_schema_in_memory_is_a_config_error_not_a_recursion_error():
    nested: dict = {}
    for _ in range(5000):
        nested = {"type": "array", "items": nested}
    with pytest.raises(ConfigError, match="nested too deeply"):
        check_schema(nested, "deep", 10**9)


def test_deeply_nested_answer_is_invalid_json_not_a_crash():
    from guided_ab.load.client import RawResponse

    raw = RawResponse(sent_at=0.0, http_status=200, finish_reason="stop", text="[" * 100_000)
    assert classify(raw, SCHEMA)[0] == "invalid_json"


# -- server garbage that used to crash a whole phase (now one record each) ---------------------------
GARBAGE_STREAMS = {
    "content-not-a-string": [b'data: {"choices": [{"delta": {"content": 5}}]}', b"data: [DONE]"],
    "finish-reason-not-a-string": [b'data: {"choices": [{"delta": {"content": "{}"}, "finish_reason": 7}]}'],
    "token-count-not-an-int": [b'data: {"choices": [{"delta": {"content": "{}"}, "finish_reason": "stop"}]}',
                               b'data: {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": 1.5}}'],
}


@pytest.mark.parametrize("name", sorted(GARBAGE_STREAMS))
def test_wrongly_typed_stream_fields_are_invalid_json_not_a_crash(name):
    from guided_ab.load.client import RawResponse, _StreamState

    out = RawResponse(sent_at=0.0, http_status=200)
    state = _StreamState(out)
    for i, line in enumerate(GARBAGE_STREAMS[name]):
        if not state.feed(line, float(i), 0.0):
            break
    state.finish()
    outcome, error = classify(out, SCHEMA)
    assert outcome == "invalid_json" and "malformed stream event" in error
    writable_record(out, outcome, error)


@pytest.mark.parametrize("body", [
    b'{"choices": [{"message": {"content": "\\ud800"}, "finish_reason": "stop"}]}',  # a lone surrogate
    b'{"choices": [{"message": {"content": {"a": 1}}, "finish_reason": "stop"}]}',
    b'{"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": "x"}}',
    b'{"choices": [{"message": {"content": "{}"}}], "usage": [1]}',
])
def test_wrongly_typed_bodies_are_invalid_json_not_a_crash(body):
    from guided_ab.load.client import RawResponse, _read_body

    out = RawResponse(sent_at=0.0, http_status=200)
    _read_body(body, out)
    outcome, error = classify(out, SCHEMA)
    assert outcome == "invalid_json"
    writable_record(out, outcome, error)


def test_a_non_utf8_attribution_header_still_gives_a_writablewritable_record():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"choices": [{"message": {"content": "{\\"name\\": \\"ab\\", \\"age\\": 3}"}, "finish_reason": "stop"}]}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-guided-ab-backend: gu\xffid\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    async def go():
        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        async with new_session(1) as http:
            raw = await send_chat(http, url, chat_body("m", "p", SCHEMA, name="s", temperature=0, max_tokens=8, stream=False),
                                  api_key=None, timeout_s=5)
        srv.close()
        return raw

    raw = asyncio.run(go())
    outcome, error = classify(raw, SCHEMA)
    assert outcome == "success" and raw.backend == "gu?id"
    writable_record(raw, outcome, error)
