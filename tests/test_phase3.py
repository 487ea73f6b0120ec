"""Phase 3 (issue 20): promote the A/B's winner, watch production against a live control over one
sequential window, end in keep or revert. End to end against the loopback fault server (external
arms stand in for production and the control; a switch of the server's mode makes production
worse mid-window; the revert automation of prefect.yaml, created on the test API as `prefect
deploy` creates it, fires on the alert and its flow run waits for a sign-off); offline
promote/revert on Modal against a fake of the thin SDK layer only. tests/test_phase3_vllm.py runs
the window on real local vLLM servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_modal_target import FakeModal
from test_prefect_production import _resume
from test_sequential import _run

from guided_ab import monitor, promote
from guided_ab.arms import modal as modal_target
from guided_ab.config import ConfigError, load_config, parse_config
from guided_ab.errors import RunStateError
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-phase3-0123456789"
# 3 (or 5) monitoring runs, 20 minutes apart: the week compressed to an hour or so (the tests call
# the runs at once; the window's time is long enough never to end it first on a slow machine)
THREE_RUNS = {"window_days": 3 * 20 / 1440, "cadence_hours": 20 / 60}
FIVE_RUNS = {"window_days": 5 * 20 / 1440, "cadence_hours": 20 / 60}


def _config(root: Path, control_url: str, cand_url: str, production: dict) -> dict:
    arm = {"target": "external", "api_key_env": "P3_TEST_KEY", "model": "guided-ab-model"}
    return {
        "name": "p3", "store": str(root), "phases": ["deploy", "ab"],
        "arms": [{"name": "guidance", "role": "control", "backend": "guidance", "url": control_url, **arm},
                 {"name": "auto", "role": "candidate", "backend": "auto", "url": cand_url, **arm}],
        "workload": {"observe_size": 0, "warmup": 1, "concurrency": 4, "timeout_s": 20},
        # 20 agreeing schemas bound the success difference to ~±0.2: a 25-point margin is met at look 1
        "decision": {"bootstrap_resamples": 200, "success_margin": 0.25, "sequential": {"pairs_per_look": 20, "max_pairs": 40}},
        "production": {"target": "external", "url": cand_url, "api_key_env": "P3_TEST_KEY",
                       "control_url": control_url, "control_api_key_env": "P3_TEST_KEY", "pairs_per_run": 20, **production},
    }


def _ab(cfg_data: dict, run_id: str) -> RunStore:
    """The experiment without Prefect (tests/test_sequential.py's `_run`): a switch to 'auto'."""
    store = _run(cfg_data, run_id)
    d = store.read_json("decision.json")
    assert d["verdict"] == "switch" and d["serve"] == "auto", d["reasons"]
    return store


@pytest.fixture()
def key_env(monkeypatch):
    monkeypatch.setenv("P3_TEST_KEY", KEY)


def _one_record_per_request(store: RunStore) -> None:
    plan = json.loads(store.path("plan-monitor.json").read_text())
    ids = [r.request_id for r in store.journal("monitor")]
    assert len(ids) == len(set(ids)) == len(plan["requests"])


def _deployment_spec(name: str) -> dict:
    return next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == name)


def create_deployment(name: str):
    """prefect.yaml's deployment `name` on the test API (its flow and entrypoint; no work pool: the
    tests run its flow runs themselves), and its automations from the deployment's `triggers`, as
    `prefect deploy` creates them (prefect/cli/deploy/_triggers.py: each trigger validated as a
    DeploymentTrigger, bound to the deployment, created as an automation; the deployment's old
    automations deleted first, so a second call does not fire twice). Its id."""
    from prefect.client.orchestration import get_client
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    spec = _deployment_spec(name)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(spec["entrypoint"].rsplit(":", 1)[1])
        dep_id = client.create_deployment(flow_id=flow_id, name=name, entrypoint=spec["entrypoint"])
        client.delete_resource_owned_automations(f"prefect.deployment.{dep_id}")
        for i, t in enumerate(spec.get("triggers") or [], start=1):
            trigger = TypeAdapter(DeploymentTriggerTypes).validate_python({"name": f"{name}__automation_{i}", **t})
            trigger.set_deployment_id(dep_id)
            client.create_automation(trigger.as_automation())
    return dep_id


@pytest.fixture()
def monitor_deployment(prefect_harness):
    """The `monitor` deployment of prefect.yaml on the test API (what promote puts the window's schedule on)."""
    return create_deployment("monitor")


@pytest.fixture()
def revert_deployment(prefect_harness):
    """The `revert` deployment of prefect.yaml with its automation (fires on the monitor's alert)."""
    return create_deployment("revert")


def _window_schedule(dep_id, run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [s for s in client.read_deployment_schedules(dep_id) if s.slug == f"window-{run_id}"]


def automation_runs(dep_id, run_id: str, *, wait_s: float = 0.0) -> list:
    """The flow runs of the revert deployment for `run_id` (the automation's), after waiting up to
    wait_s for the first (the trigger service reacts to the event within a second or two)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [fr for fr in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
                    if fr.parameters.get("run_id") == run_id]
            if runs or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def run_with_sign_off(flow_run, answer: dict):
    """Run a flow run of the revert deployment as a worker would (the flow engine on that flow run,
    in a thread here) and answer its sign-off form through the API as a reviewer does in the UI.
    The flow's return value; the test fails if it never pauses for the form."""
    import contextvars
    import time
    from concurrent.futures import ThreadPoolExecutor

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.revert import revert as revert_flow

    with ThreadPoolExecutor(1) as pool:
        # the harness's settings live in context variables: the flow's thread needs them too
        done = pool.submit(contextvars.copy_context().run, run_flow, revert_flow, flow_run=flow_run,
                           parameters=flow_run.parameters, return_type="state")
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not client.read_flow_run(flow_run.id).state.is_paused():
                assert not done.done(), f"the revert ended without asking for a sign-off: {done.result()}"
                assert time.monotonic() < deadline, "the revert never paused for its sign-off"
                time.sleep(0.5)
        _resume(flow_run.id, answer)
        state = done.result(timeout=120)
    assert state.is_completed(), state
    return state.result()


def test_promote_three_monitoring_runs_one_window_keep(tmp_path, key_env, monitor_deployment):
    from flows.monitor import monitor as monitor_flow
    from flows.promote import promote as promote_flow

    root = tmp_path / "runs"
    with FaultServer("healthy", api_key=KEY, delay_s=0.08) as slow, FaultServer("healthy", api_key=KEY, delay_s=0.02) as fast:
        store = _ab(_config(root, slow.url, fast.url, THREE_RUNS), "keep")
        dry = promote_flow(run_id="keep", store=str(root), dry_run=True)
        assert not store.has("promotion.json") and "dry run: nothing was deployed" in dry["text"]
        assert "change backend: guidance -> auto" in dry["text"] and "--structured-outputs-config.backend auto" in dry["text"]
        rec = promote_flow(run_id="keep", store=str(root))
        assert rec["status"] == "monitoring" and rec["window"]["planned_runs"] == 3 and rec["from"]["backend"] == "guidance"
        (sched,) = _window_schedule(monitor_deployment, "keep")  # promote opened the window on the monitor deployment
        assert sched.active and sched.parameters == {"run_id": "keep", "store": str(root)}
        assert sched.schedule.interval.total_seconds() == pytest.approx(1200)
        results = [monitor_flow(run_id="keep", store=str(root)) for _ in range(3)]
        after = monitor.monitor_once(store, log=lambda m: None)  # the window is closed: nothing more is sent
        from typer.testing import CliRunner

        from guided_ab.cli import app

        res = CliRunner().invoke(app, ["monitor", "--run-id", "keep", "--store", str(root)])
        assert res.exit_code == 0 and "window closed (kept) verdict=keep" in res.output, res.output
    assert [r["verdict"] for r in results] == ["continue", "continue", "keep"], [r["reason"] for r in results]
    assert not any(r["alert"] for r in results) and after["ran"] is False
    assert not _window_schedule(monitor_deployment, "keep")[0].active  # the window's end turned its schedule off
    st = store.read_json("monitoring.json")
    assert [r["pairs"] for r in st["runs"]] == [20, 40, 60]  # one record set, the window judged as a whole
    assert st["runs"][-1]["information"] == pytest.approx(1.0) and st["verdict"] == "keep"
    widths = [r["success_diff"]["ci_high"] - r["success_diff"]["ci_low"] for r in st["runs"]]
    assert widths[-1] < widths[0]  # the running interval narrows as the window fills
    assert st["runs"][-1]["latency_ratio"]["ci_high"] < 1.1
    _one_record_per_request(store)
    p = store.read_json("promotion.json")
    assert p["status"] == "kept" and p["ended"]["stopped"][0]["role"] == "control"  # the live control is no longer needed
    page = store.path("monitor-report.html").read_text()
    assert "running interval" in page and "<svg" in page and "keep" in page


def test_production_made_worse_mid_window_recommends_revert_early(tmp_path, key_env, monitor_deployment, revert_deployment):
    """The alert fires prefect.yaml's automation for real: the test Prefect server's trigger
    service creates a flow run of the `revert` deployment for this run (its store passed on), which
    waits for a sign-off; approved, it reverts. Nothing is sent after the early stop."""
    from flows.monitor import monitor as monitor_flow
    from flows.promote import promote as promote_flow

    root = tmp_path / "runs"
    with FaultServer("healthy", api_key=KEY, delay_s=0.05) as control, FaultServer("healthy", api_key=KEY, delay_s=0.02) as prod:
        store = _ab(_config(root, control.url, prod.url, FIVE_RUNS), "worse")
        promote_flow(run_id="worse", store=str(root))
        first = monitor_flow(run_id="worse", store=str(root))
        assert first["verdict"] == "continue"
        prod.mode, prod.delay_s = "wrong", 0.3  # production breaks: answers that violate the schema, slowly
        results = [first]
        while not results[-1]["final"] and len(results) < 5:
            results.append(monitor_flow(run_id="worse", store=str(root)))
        assert results[-1]["verdict"] == "revert" and results[-1]["early"] and len(results) < 5, [r["reason"] for r in results]
        assert results[-1]["alert"] and "success" in results[-1]["reason"]
        (fired,) = automation_runs(revert_deployment, "worse", wait_s=60)  # the automation fired, once
        assert fired.parameters == {"run_id": "worse", "store": str(root), "reason": "revert recommended by the monitoring window",
                                    "ask_sign_off": True}
        assert promote.load(store)["status"] == "revert-recommended"  # nothing reverted before the sign-off
        sent_before = prod.stats["chat"] + control.stats["chat"]
        later = monitor.monitor_once(store, log=lambda m: None)
        assert prod.stats["chat"] + control.stats["chat"] == sent_before and later["ran"] is False  # nothing sent any more
        reverted = run_with_sign_off(fired, {"decision": "approve", "reason": "errors in production", "reviewer": "oncall"})
    assert not _window_schedule(monitor_deployment, "worse")[0].active  # no more monitoring runs scheduled
    assert store.read_json("monitoring.json")["stopped_because"] == "regression"
    assert reverted["status"] == "reverted" and "backend guidance" in reverted["text"]
    ended = store.read_json("promotion.json")["ended"]
    assert ended["how"] == "reverted" and ended["reason"] == "revert recommended by the monitoring window"
    assert len(automation_runs(revert_deployment, "worse")) == 1
    with pytest.raises(RunStateError, match="has ended"):
        promote.revert(store, log=lambda m: None)


def test_a_rejected_revert_sign_off_leaves_production_as_it_is(tmp_path, revert_deployment):
    """The revert's own sign-off (ask_sign_off, as the automation passes it): a rejection reverts
    nothing and leaves the window as it was. (A promoted external run: nothing is sent, so its
    `switch` is written as the decide step writes it, no A/B needed.)"""
    cfg = parse_config(_config(tmp_path / "runs", "http://127.0.0.1:9", "http://127.0.0.1:9", THREE_RUNS))
    store = RunStore.create(cfg, "reject")
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "control": "guidance", "reasons": []})
    promote.promote(store, log=lambda m: None)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # a revert flow run asked for by hand (the UI's "Run" on the deployment)
        fr = client.create_flow_run_from_deployment(revert_deployment, parameters={
            "run_id": "reject", "store": str(tmp_path / "runs"), "ask_sign_off": True})
    out = run_with_sign_off(fr, {"decision": "reject", "reason": "the control's host is flaky", "reviewer": "oncall"})
    assert out["text"] == "revert rejected: the control's host is flaky"
    rec = promote.load(store)
    assert rec["status"] == "monitoring" and "ended" not in rec


def test_a_monitoring_run_killed_before_its_verdict_resumes_without_resending(tmp_path, key_env):
    with FaultServer("healthy", api_key=KEY, delay_s=0.05) as control, FaultServer("healthy", api_key=KEY, delay_s=0.02) as prod:
        store = _ab(_config(tmp_path / "runs", control.url, prod.url, THREE_RUNS), "resume")
        promote.promote(store, log=lambda m: None)
        monitor.monitor_once(store, log=lambda m: None)
        st = store.read_json("monitoring.json")
        store.write_json("monitoring.json", {**st, "runs": []})  # killed after sending, before the verdict was written
        sent = prod.stats["chat"] + control.stats["chat"]
        again = monitor.monitor_once(store, log=lambda m: None)
        assert prod.stats["chat"] + control.stats["chat"] == sent  # the same run, nothing re-sent
        # the window's time is over before its planned runs: this run is its last, judged over all of it
        late = monitor.monitor_once(store, log=lambda m: None, now=promote.load(store)["window"]["ends_at"] + 1)
    assert again["run"] == 1 and again["pairs"] == 20
    assert late["run"] == 2 and late["final"] and not late["early"] and late["verdict"] == "keep", late["reason"]
    _one_record_per_request(store)


def test_production_that_stops_answering_is_recorded_as_failures_not_an_error(tmp_path, key_env, monkeypatch):
    """An outage of production mid-window: the monitoring run waits for it a short while
    (PRODUCTION_ANSWER_S; shortened here), then sends anyway; production's requests are recorded
    as connection errors and count against it (no exception ends the run, the window sees it)."""
    monkeypatch.setattr(monitor, "PRODUCTION_ANSWER_S", 2.0)
    logs: list[str] = []
    with FaultServer("healthy", api_key=KEY, delay_s=0.05) as control:
        prod = FaultServer("healthy", api_key=KEY, delay_s=0.02).start()
        store = _ab(_config(tmp_path / "runs", control.url, prod.url, FIVE_RUNS), "outage")
        promote.promote(store, log=lambda m: None)
        assert monitor.monitor_once(store, log=logs.append)["verdict"] == "continue"
        prod.stop()
        second = monitor.monitor_once(store, log=logs.append)
    assert second["ran"] and second["run"] == 2
    assert any("does not answer" in m and "recorded as failures" in m for m in logs), logs
    df = store.records(("monitor",))
    down = df[(df.arm == "auto") & (df.pair_index >= 20)]
    assert len(down) == 20 and set(down.outcome) == {"connection_error"}
    assert (df[(df.arm == "guidance") & (df.pair_index >= 20)].outcome == "success").any()  # the control answered
    run2 = store.read_json("monitoring.json")["runs"][-1]
    assert run2["point"]["success_diff"] < 0 and second["verdict"] == "revert", second["reason"]  # it counts against production


def test_promote_refuses_a_run_that_is_not_a_switch(tmp_path):
    cfg = parse_config(_config(tmp_path / "runs", "http://127.0.0.1:9", "http://127.0.0.1:9", THREE_RUNS))
    store = RunStore.create(cfg, "nodecision")
    with pytest.raises(RunStateError, match="no decision.json"):
        promote.promote(store)
    store.write_json("decision.json", {"verdict": "keep", "serve": "guidance"})
    with pytest.raises(RunStateError, match="not 'switch'"):
        promote.promote(store)
    signed = parse_config({**cfg.model_dump(mode="json"), "decision": {**cfg.decision.model_dump(mode="json"), "require_approval": True}})
    store = RunStore.create(signed, "unsigned")
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "approval": {"required": True, "status": "pending"}})
    with pytest.raises(RunStateError, match="requires a sign-off"):
        promote.promote(store)
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "approval": {"required": True, "status": "approved"}})
    assert "sign-off: approved" in promote.promote(store, dry_run=True)["text"]


@pytest.mark.parametrize("production, message", [
    ({"target": "modal"}, "needs 'app_name'"),
    ({"target": "modal", "app_name": "gab-prod"}, "reaper"),
    ({"target": "external", "url": "http://x"}, "control_url"),
])
def test_production_block_is_checked(production, message):
    data = _config(Path("/tmp/none"), "http://127.0.0.1:9", "http://127.0.0.1:9", {})
    data["production"] = production
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


# -- Modal, offline: a fake of the thin SDK layer only (tests/test_modal_target.py's) ------------------
def _backend_of(app) -> str:
    """The backend the deployed app serves, from the App's own tags (set from the arm it was built for)."""
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_in(app)._local_state_attr.tags["guided-ab-backend"]


def _modal_store(tmp_path: Path, auto_replicas: dict | None = None) -> RunStore:
    """A finished `switch` to auto of the Modal example config, its production block on Modal."""
    data = load_config(REPO / "configs" / "auto-vs-guidance.yaml").model_dump(mode="json")
    if auto_replicas:
        auto = next(a for a in data["arms"] if a["name"] == "auto")
        auto["modal"]["replicas"] = {**auto["modal"]["replicas"], **auto_replicas}
    cfg = parse_config({**data, "store": str(tmp_path / "runs"), "production": {"target": "modal", "app_name": "team-llm"}})
    store = RunStore.create(cfg, "auto-vs-guidance-20251027-120000-ab12")
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "control": "guidance", "reasons": []})
    return store


@pytest.fixture()
def modal_store(tmp_path, monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")
    store = _modal_store(tmp_path)
    fake = FakeModal()
    with modal_target.use_sdk(fake):
        yield store, fake


def test_modal_promote_dry_run_shows_exactly_what_would_change(modal_store):
    store, fake = modal_store
    dry = promote.promote(store, dry_run=True, log=lambda m: None)
    assert fake.deployed == [] and not store.has("promotion.json")
    text = dry["text"]
    assert "deploy Modal app 'team-llm' (production): arm 'auto', backend auto" in text
    assert "deploy Modal app 'team-llm-control' (control): arm 'guidance', backend guidance" in text
    assert "scaled to zero between monitoring runs" in text
    assert "change backend: guidance -> auto" in text and "7 run(s) every 24 h" in text and "dry run" in text
    from typer.testing import CliRunner

    from guided_ab.cli import app

    res = CliRunner().invoke(app, ["promote", "--run-id", store.run_id, "--store", str(store.root), "--dry-run"])
    assert res.exit_code == 0 and "deploy Modal app 'team-llm' (production)" in res.output and fake.deployed == []
    res = CliRunner().invoke(app, ["revert", "--run-id", store.run_id, "--store", str(store.root), "--dry-run"])
    assert res.exit_code == 2 and "never promoted" in res.output


def test_modal_promote_then_revert_deploy_the_right_apps_with_the_right_backends(modal_store):
    store, fake = modal_store
    promote.promote(store, log=lambda m: None)
    assert [(name, _backend_of(app)) for app, name in fake.deployed] == [("team-llm", "auto"), ("team-llm-control", "guidance")]
    assert [d.get("min_containers") for d in promote.load(store)["deployed"]] == [None, 0]  # the control scales to zero
    from typer.testing import CliRunner

    from guided_ab.cli import app

    res = CliRunner().invoke(app, ["monitor-report", "--run-id", store.run_id, "--store", str(store.root)])
    assert res.exit_code == 0 and "No monitoring run yet" in Path(res.output.strip()).read_text()
    eps = promote.monitor_endpoints(store, promote.load(store))
    assert eps["auto"].base_url == "https://ws--team-llm-serve.modal.run" and eps["guidance"].app_name == "team-llm-control"
    assert promote.promote(store, log=lambda m: None)["text"].startswith("already promoted") and len(fake.deployed) == 2
    dry = promote.revert(store, dry_run=True, log=lambda m: None)
    assert len(fake.deployed) == 2 and "deploy Modal app 'team-llm' (production) with arm 'guidance': backend guidance" in dry["text"]
    rec = promote.revert(store, reason="p99 regressed", log=lambda m: None)
    assert [(name, _backend_of(app)) for app, name in fake.deployed[2:]] == [("team-llm", "guidance")]
    assert fake.stop_calls == ["team-llm-control"]  # the endpoint no longer needed is stopped
    assert {a.name for a in fake.apps.values() if a.live} == {"team-llm"}  # nothing else left running
    assert rec["status"] == "reverted" and rec["ended"]["stopped"][0]["stopped"] is True
    assert rec["ended"]["stopped"][0]["cost_usd"] >= 0


def test_modal_promote_serves_production_with_the_winners_replicas(tmp_path, monkeypatch):
    """Production takes the team's traffic: promote deploys the winner with its own
    `modal.replicas` (the A/B's one warm container is not a production size); the dry run says
    so; the live control still scales to zero."""
    from test_modal_replicas import _function_settings

    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")
    store = _modal_store(tmp_path, {"min_containers": 2, "max_containers": 6, "target_inputs": 8})
    fake = FakeModal()
    with modal_target.use_sdk(fake):
        dry = promote.promote(store, dry_run=True, log=lambda m: None)
        assert "'team-llm' (production): arm 'auto', backend auto, model" in dry["text"]
        assert "2-6 container(s) (modal.replicas, autoscaler target 8 requests each)" in dry["text"] and fake.deployed == []
        promote.promote(store, log=lambda m: None)
    settings = {name: _function_settings(app) for app, name in fake.deployed}
    max_inputs = store.load_config().arm("auto").modal.max_concurrent_inputs
    assert settings["team-llm"] == {"min_containers": 2, "max_containers": 6, "target_inputs": 8, "max_inputs": max_inputs}
    assert settings["team-llm-control"]["min_containers"] == 0


# -- the example configs ------------------------------------------------------------------------
def test_the_phase3_example_config_plans_a_week_against_a_live_control(tmp_path, monkeypatch):
    """configs/phase3-local.yaml: the embedded default's A/B with an external production block;
    after a switch, the dry run names the operator's steps and the week's pre-registered shape."""
    cfg = load_config(REPO / "configs" / "phase3-local.yaml")
    cfg = parse_config({**cfg.model_dump(mode="json"), "store": str(tmp_path / "runs")})
    assert [a.target for a in cfg.arms] == ["local", "local"] and cfg.production.target == "external"
    store = RunStore.create(cfg, "phase3-local-1")
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "control": "guidance", "reasons": []})
    text = promote.promote(store, dry_run=True, log=lambda m: None)["text"]
    assert "operator: on the production server (http://127.0.0.1:8000), start vLLM with " \
           "`--structured-outputs-config.backend auto`" in text
    assert "keep http://127.0.0.1:8001 serving `guidance`" in text
    assert "7 run(s) every 24 h, 20 pairs each (140 planned pairs), margins: success -5.0%, latency ratio 1.100" in text
    assert not store.has("promotion.json")


def test_the_commented_modal_production_block_is_valid_when_uncommented():
    """configs/auto-vs-guidance.yaml carries the Modal production block as a comment (a team
    pre-registers it by uncommenting): uncommented as written, it loads and names the apps."""
    text = (REPO / "configs" / "auto-vs-guidance.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# production:")
    block = [ln[2:] for ln in lines[start:] if ln.startswith("# ")]
    assert len(block) > 3
    data = yaml.safe_load(text) | yaml.safe_load("\n".join(block))
    cfg = parse_config(data)
    assert cfg.production.target == "modal" and cfg.production.control_app == "qwen-vllm-inference-control"
    assert cfg.production.planned_runs == 7 and cfg.production.window_pairs == 140
