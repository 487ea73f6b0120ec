"""Phase 3 (issue 20): promote the A/B's winner, watch production against a live control over one
sequential window, end in keep or revert. End to end against the loopback fault server (external
arms stand in for production and the control; a switch of the server's mode makes production
worse mid-window); offline promote/revert on Modal against a fake of the thin SDK layer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_modal_target import FakeModal
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


@pytest.fixture()
def monitor_deployment(prefect_harness):
    """The `monitor` deployment of prefect.yaml on the test API (what promote puts the window's schedule on)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("monitor")
        dep_id = client.create_deployment(flow_id=flow_id, name="monitor", entrypoint="flows/monitor.py:monitor")
    return dep_id


def _window_schedule(dep_id, run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [s for s in client.read_deployment_schedules(dep_id) if s.slug == f"window-{run_id}"]


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


def test_production_made_worse_mid_window_recommends_revert_early(tmp_path, key_env, monitor_deployment, monkeypatch):
    import flows._monitor_window as window
    from flows.monitor import monitor as monitor_flow
    from flows.promote import promote as promote_flow
    from flows.revert import revert as revert_flow

    fired: list[dict] = []
    real_emit = window.emit_event
    monkeypatch.setattr(window, "emit_event", lambda **kw: fired.append(kw) or real_emit(**kw))
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
        sent_before = prod.stats["chat"] + control.stats["chat"]
        later = monitor.monitor_once(store, log=lambda m: None)
        assert prod.stats["chat"] + control.stats["chat"] == sent_before and later["ran"] is False  # nothing sent any more
        reverted = revert_flow(run_id="worse", store=str(root), reason="regression")
    assert results[-1]["verdict"] == "revert" and results[-1]["early"] and len(results) < 5, [r["reason"] for r in results]
    assert results[-1]["alert"] and "success" in results[-1]["reason"]
    assert [f["event"] for f in fired] == [monitor.ALERT_EVENT] and fired[0]["resource"]["prefect.resource.name"] == "worse"
    # ... which is what the automation on the `revert` deployment (prefect.yaml) fires on
    import fnmatch

    import yaml

    (trigger,) = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == "revert")["triggers"]
    assert monitor.ALERT_EVENT in trigger["expect"] and trigger["enabled"]
    assert fnmatch.fnmatch(fired[0]["resource"]["prefect.resource.id"], trigger["match"]["prefect.resource.id"])
    assert trigger["parameters"]["run_id"] == "{{ event.resource.name }}" and trigger["parameters"]["ask_sign_off"] is True
    assert not _window_schedule(monitor_deployment, "worse")[0].active  # no more monitoring runs scheduled
    assert store.read_json("monitoring.json")["stopped_because"] == "regression"
    assert reverted["status"] == "reverted" and "backend guidance" in reverted["text"]
    assert store.read_json("promotion.json")["ended"]["how"] == "reverted"
    with pytest.raises(RunStateError, match="has ended"):
        promote.revert(store, log=lambda m: None)


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


@pytest.fixture()
def modal_store(tmp_path, monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")
    cfg = load_config(REPO / "configs" / "auto-vs-guidance.yaml")
    cfg = parse_config({**cfg.model_dump(mode="json"), "store": str(tmp_path / "runs"),
                        "production": {"target": "modal", "app_name": "team-llm"}})
    store = RunStore.create(cfg, "auto-vs-guidance-20251027-120000-ab12")
    store.write_json("decision.json", {"verdict": "switch", "serve": "auto", "control": "guidance", "reasons": []})
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
