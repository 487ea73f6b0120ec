"""Retries fire for what a retry can fix and only for that: the classification (tasks/retry.py)
and the real `wait-endpoints` Prefect task against a loopback endpoint that is cold at first."""

from __future__ import annotations

import httpx
import pytest
from prefect import flow, task
from prefect.states import Completed, Failed

from guided_ab import phases
from guided_ab.arms.external import endpoint
from guided_ab.config import parse_config
from guided_ab.errors import (
    ArmNotReady,
    ArmRefused,
    ConfigError,
    GuidedABError,
    ModalNotReady,
    ModalTargetError,
    ModelError,
    RunStateError,
    ServerStartError,
)
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore
from tasks.retry import is_transient, retry_if_transient

KEY = "retry-test-key-0123456789"


# -- the classification ---------------------------------------------------------------------------
@pytest.mark.parametrize("exc, transient", [
    (ArmNotReady("cold start"), True),
    (ModalNotReady("cold start"), True),
    (ModalTargetError("deploy failed: no route", transient=True), True),
    (httpx.ConnectError("refused"), True),
    (ConnectionError("reset"), True),
    (TimeoutError(), True),
    (ArmRefused("HTTP 401"), False),
    (ServerStartError("exited"), False),
    (ModalTargetError("quota"), False),
    (ModelError("conversion failed"), False),
    (ConfigError("bad field"), False),
    (RunStateError("run the deploy phase first"), False),
    (ValueError("a bug"), False),
    (KeyError("a bug"), False),
    (None, False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_retry_condition_reads_the_failed_state():
    assert retry_if_transient(None, None, Failed(data=ArmNotReady("cold"))) is True
    assert retry_if_transient(None, None, Failed(data=ArmRefused("HTTP 403"))) is False
    assert retry_if_transient(None, None, Failed(data=RunStateError("deploy first"))) is False
    assert retry_if_transient(None, None, Completed(data=1)) is False


def test_every_error_is_in_one_tree():
    for cls in (ArmNotReady, ArmRefused, ConfigError, RunStateError, ModalNotReady, ServerStartError, ModelError):
        assert issubclass(cls, GuidedABError)
    assert issubclass(ConfigError, ValueError) and issubclass(ModalNotReady, ModalTargetError)


# -- a task decorated like wait-endpoints -----------------------------------------------------------
def test_a_transient_failure_is_retried_and_a_refusal_is_not(prefect_harness):
    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def poll(fail_with: list[BaseException]) -> str:
        calls.append("poll")
        if fail_with:
            raise fail_with.pop(0)
        return "ready"

    @flow
    def deploy(fail_with: list[BaseException]) -> str:
        return poll(fail_with)

    assert deploy([ArmNotReady("503 while cold-starting")]) == "ready"
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(ArmRefused):
        deploy([ArmRefused("HTTP 401"), ArmRefused("HTTP 401")])
    assert len(calls) == 1


# -- the real wait-endpoints task against a cold-starting endpoint ------------------------------------
def _run_with_external_arms(tmp_path, url: str, key_env: str, timeout_s: float) -> tuple:
    cfg = parse_config({
        "name": "retry", "store": str(tmp_path / "runs"), "server_start_timeout_s": timeout_s,
        "arms": [
            {"name": "control", "role": "control", "target": "external", "backend": "guidance", "url": url,
             "api_key_env": key_env},
            {"name": "cand", "role": "candidate", "target": "external", "backend": "auto", "url": url,
             "api_key_env": key_env},
        ],
    })
    store = RunStore.create(cfg, "retry-run")
    phases.save_endpoints(store, {
        a.name: endpoint(run_id=store.run_id, arm=a.name, url=url, model="m", backend=a.backend, api_key_env=key_env)
        for a in cfg.arms
    })
    return cfg, store


def _deploy_flow(cfg, store):
    """The real task, with retries after 0 s instead of 5-20 s, in a flow (as flows/deploy.py runs it)."""
    from tasks.endpoints import wait_endpoints

    @flow
    def deploy() -> dict[str, float]:
        return wait_endpoints.with_options(retry_delay_seconds=0, retry_jitter_factor=None)(cfg, store)

    return deploy


@pytest.fixture
def counted_waits(monkeypatch):
    """How often the task body ran (it calls phases.wait_endpoints once per attempt)."""
    calls: list[int] = []
    real = phases.wait_endpoints

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(phases, "wait_endpoints", counting)
    return calls


def test_wait_endpoints_retries_an_endpoint_that_is_still_cold(prefect_harness, tmp_path, monkeypatch, counted_waits):
    monkeypatch.setenv("RETRY_KEY", KEY)
    # /v1/models answers 503 for 0.5 s from the first request; the first attempt's deadline is 1 s
    # (its only poll is at t=0: the next would come after 2 s), so it ends in ArmNotReady
    with FaultServer("storm", api_key=KEY, cold_start_s=0.5) as srv:
        cfg, store = _run_with_external_arms(tmp_path, srv.url, "RETRY_KEY", timeout_s=1.0)
        waited = _deploy_flow(cfg, store)()
        assert srv.stats["cold"] >= 1, srv.stats
    assert len(counted_waits) == 2, "one transient failure, then one successful retry"
    assert set(waited) == {"control", "cand"}
    assert store.read_json("deploy.json")["ready_after_s"] == waited


def test_wait_endpoints_does_not_retry_a_refused_key(prefect_harness, tmp_path, monkeypatch, counted_waits):
    monkeypatch.setenv("RETRY_KEY", "not-the-key")
    with FaultServer("healthy", api_key=KEY) as srv:
        cfg, store = _run_with_external_arms(tmp_path, srv.url, "RETRY_KEY", timeout_s=30.0)
        with pytest.raises(ArmRefused, match=r"refused our API key \(HTTP 401\).*RETRY_KEY"):
            _deploy_flow(cfg, store)()
    assert len(counted_waits) == 1
    assert not store.has("deploy.json")
