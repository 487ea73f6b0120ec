"""The whole experiment on real vLLM CPU servers through the Prefect flow (slow: starts servers).

Needs .venv-vllm (scripts/install.sh); the embedded model is converted once into the cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from guided_ab.arms import local
from guided_ab.records import OUTCOMES
from guided_ab.store import RunStore

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]


def _has_vllm() -> bool:
    try:
        local.vllm_version(local.vllm_python())
        return True
    except Exception:
        return False


if not _has_vllm():
    pytest.skip("vLLM is not installed for the local target (run scripts/install.sh)", allow_module_level=True)


def tiny_config(tmp_path: Path, name: str, **workload) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    cfg["name"] = name
    cfg["store"] = str(tmp_path / "runs")
    cfg["workload"].update({"size": 4, "observe_size": 2, "warmup": 1, "max_tokens": 64, "repeats": 1, **workload})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def assert_servers_gone(store: RunStore) -> None:
    endpoints = store.read_json("endpoints.json")
    deadline = time.monotonic() + 15
    for ep in endpoints.values():
        while local._alive(ep["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not local._alive(ep["pid"]), f"server of arm {ep['arm']} (pid {ep['pid']}) is still running"
        # a group SIGKILLed at the end of its grace (a loaded machine) takes a moment to be gone
        while time.monotonic() < deadline:
            try:
                os.killpg(ep["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.killpg(ep["pid"], 0)  # the whole process group (engine workers too) is gone
    assert [r for r in local.leftovers() if r["run_id"] == store.run_id] == []


def test_small_paired_experiment_through_prefect(prefect_harness, tmp_path):
    from flows.experiment import experiment

    # the A/B as an open loop: Poisson arrivals at 1 pair/s (the CPU model answers a few requests/s)
    ab_load = {"profile": "poisson", "rate": 1.0, "max_in_flight": 4, "count": 4}
    cfg_path = tiny_config(tmp_path, "it-local", load={"ab": ab_load})
    result = experiment(config_path=str(cfg_path))
    store = RunStore.open(tmp_path / "runs", result["run_id"])
    assert result["decision"] in {"switch", "keep", "inconclusive", "invalid"}

    plans = {ph: store.read_json(f"plan-{ph}.json") for ph in ("observe", "ab")}
    df = store.records()
    # exactly one record per planned request, per phase and arm
    for ph, plan in plans.items():
        planned = sorted(r["request_id"] for r in plan["requests"])
        got = sorted(df.loc[df.phase == ph, "request_id"])
        assert got == planned, ph
    ab = df[df.phase == "ab"]
    assert set(ab.arm) == {"guidance", "auto"}
    assert ab.groupby("arm").size().to_dict() == {"guidance": 5, "auto": 5}  # 4 pairs + 1 warm-up
    # open loop: each A/B record carries when it was due and how late it went out; both arms of
    # a pair were due at one instant; the closed-loop observe phase has no schedule
    assert ab.scheduled_at.notna().all() and ab.send_lag_s.notna().all()
    assert ((ab.sent_at - ab.scheduled_at - ab.send_lag_s).abs() < 1e-6).all()
    assert (ab.send_lag_s > -0.01).all()  # never sent before its time
    assert (ab.groupby("pair_index").scheduled_at.nunique() == 1).all()
    assert df.loc[df.phase == "observe", "scheduled_at"].isna().all()
    # the servers' own /metrics, scraped beside the A/B phase, are in the run store for each arm
    scrapes = store.metric_scrapes("ab")
    assert set(scrapes) == {"guidance", "auto"} and all(scrapes.values()), scrapes.keys()
    assert set(df.outcome) <= set(OUTCOMES)
    # every request the server answered carries the backend the server resolved
    answered = df[df.http_status.notna()]
    assert answered.backend.notna().all(), answered[answered.backend.isna()][["arm", "schema_id", "http_status"]]
    assert set(answered.loc[answered.arm == "guidance", "backend"]) == {"guidance"}
    assert set(answered.loc[answered.arm == "auto", "backend"]) <= {"xgrammar", "guidance", "outlines"}
    # ... and names the server process that answered (hostname:pid here): one per local arm, not shared
    containers = answered.groupby("arm").served_by.unique()
    assert answered.served_by.notna().all() and all(len(c) == 1 for c in containers), containers
    assert containers["guidance"][0] != containers["auto"][0]
    assert (df.loc[df.outcome == "success", "latency_s"] > 0).all()
    assert (df.loc[(df.outcome == "success") & df.stream, "ttft_s"] > 0).all()

    evaluation = store.read_json("evaluation.json")
    assert evaluation["observe"]["schema_backends"], "per-schema backend of auto reported from data"
    auto_sent = answered[(answered.arm == "auto") & ~answered.warmup]
    resolved = evaluation["schema_backends"]["auto"]["by_backend"]
    assert {(b, s) for b, ids in resolved.items() for s in ids} == set(zip(auto_sent.backend, auto_sent.schema_id))
    assert "resolved, per schema it was sent" in store.path("report.md").read_text()
    decision = store.read_json("decision.json")
    assert decision["verdict"] == result["decision"]
    assert store.path("report.md").is_file()
    teardown = store.read_json("teardown.json")
    assert {e["arm"] for e in teardown["arms"]} == {"guidance", "auto"}
    assert_servers_gone(store)


def test_ab_phase_fault_stops_every_endpoint_and_keeps_records(prefect_harness, tmp_path, monkeypatch):
    """An injected fault in the A/B phase: flow Failed with the message, servers gone, records kept."""
    import guided_ab.load.runner as runner
    from flows.experiment import experiment

    real_send = runner.send_chat
    calls = {"n": 0}

    async def flaky_send(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected fault: the load generator crashed")
        return await real_send(*args, **kwargs)

    monkeypatch.setattr(runner, "send_chat", flaky_send)
    cfg_path = tiny_config(tmp_path, "it-fault", observe_size=0, size=3, max_tokens=32, concurrency=1)
    state = experiment(config_path=str(cfg_path), return_state=True)
    assert state.is_failed()
    assert "injected fault" in str(state.message) or "injected fault" in repr(state.result(raise_on_failure=False))
    run_dir = next((tmp_path / "runs").iterdir())
    store = RunStore.open(tmp_path / "runs", run_dir.name)
    records = store.records(("ab",))
    assert len(records) == 3  # what was recorded before the fault is kept
    assert_servers_gone(store)
