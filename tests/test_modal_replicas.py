"""Modal arms with replicas, offline: `modal.replicas` reaches the arm's Modal function (as Modal
would receive it, read from the real SDK objects; only the thin SDK layer is faked, with
test_modal_target.FakeModal), bad replica settings are refused naming the field, the container
that served each request is recorded (the real attribution middleware behind a loopback ASGI
server, driven by the real load runner), and the report shows latency per container."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from synthetic_run import make_finished_run
from test_modal_target import CONFIG, FakeModal, modal_arm

from guided_ab.arms import modal as modal_target
from guided_ab.arms.base import Endpoint
from guided_ab.arms.vllm_args import ATTRIBUTION_HEADER, SERVED_BY_HEADER
from guided_ab.config import ConfigError, ExperimentConfig, Workload, load_config, parse_config
from guided_ab.in_server import attribution
from guided_ab.load.runner import run_plan
from guided_ab.plan import make_plan
from guided_ab.records import RequestRecord
from guided_ab.reports.files import write_reports
from guided_ab.reports.model import NO_CONTAINER, build_report
from guided_ab.store import RunStore
from guided_ab.workload import WorkItem

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "auto-vs-guidance-20251027-120000-ab12"

pytestmark = pytest.mark.timeout(180)


def _function_settings(app) -> dict:
    """What Modal receives for the app's web function: the autoscaler settings, and the
    @modal.concurrent limits (read offline from the Function's loader closure, as Modal's own
    deploy would read them)."""
    from modal._utils.async_utils import synchronizer

    fn = synchronizer._translate_in(app)._local_state.functions["serve"]
    cells = dict(zip(fn._load.__code__.co_freevars, (c.cell_contents for c in fn._load.__closure__ or ())))
    auto = cells["autoscaler_settings"]
    return {"min_containers": auto.min_containers, "max_containers": auto.max_containers,
            "target_inputs": cells["target_concurrent_inputs_int"], "max_inputs": cells["max_concurrent_inputs"]}


def _config(tmp_path: Path, **replicas_by_arm: dict) -> ExperimentConfig:
    data = load_config(CONFIG).model_dump(mode="json")
    data["store"] = str(tmp_path / "runs")
    for arm in data["arms"]:
        arm["modal"]["replicas"] = {**arm["modal"]["replicas"], **replicas_by_arm.get(arm["name"], {})}
    return ExperimentConfig.model_validate(data)


@pytest.fixture()
def fake(monkeypatch):
    monkeypatch.setenv(modal_target.API_KEY_ENV, "test-key")
    f = FakeModal()
    with modal_target.use_sdk(f):
        yield f


# -- the settings reach the function -----------------------------------------------------------
def test_replica_settings_reach_the_deployed_function_and_the_cost(fake, tmp_path):
    cfg = _config(tmp_path, auto={"min_containers": 2, "max_containers": 6, "target_inputs": 8})
    store = RunStore.create(cfg, RUN_ID)
    eps = {arm.name: modal_target.deploy(arm, store) for arm in cfg.arms}
    settings = {name.rsplit("-", 1)[1]: _function_settings(app) for app, name in fake.deployed}
    max_inputs = cfg.arm("auto").modal.max_concurrent_inputs
    assert settings["auto"] == {"min_containers": 2, "max_containers": 6, "target_inputs": 8, "max_inputs": max_inputs}
    # the A/B default: one container, warm from deploy to teardown, never more (0 = no autoscaler target)
    assert settings["guidance"] == {"min_containers": 1, "max_containers": 1, "target_inputs": 0,
                                    "max_inputs": cfg.arm("guidance").modal.max_concurrent_inputs}
    # the held cost counts every warm container; one container's price is unchanged
    per_container = cfg.arm("auto").modal.cost_per_hour
    assert eps["auto"].cost_per_hour == pytest.approx(2 * per_container)
    assert eps["guidance"].cost_per_hour == pytest.approx(cfg.arm("guidance").modal.cost_per_hour)


def test_the_production_app_runs_the_winners_replicas(fake):
    """Phase 3 deploys the winner with the arm's own replicas; the live control still scales to zero."""
    from guided_ab import promote

    arm = modal_arm(modal=dict(replicas=dict(min_containers=3, max_containers=10, target_inputs=4)))
    promote._deploy_modal(arm, "gab-prod-auto", "run-1", "candidate")
    promote._deploy_modal(arm, "gab-prod-control", "run-1", "control")
    (winner, _), (control, _) = fake.deployed
    assert _function_settings(winner) == {"min_containers": 3, "max_containers": 10, "target_inputs": 4, "max_inputs": 32}
    assert _function_settings(control)["min_containers"] == promote.CONTROL_MIN_CONTAINERS == 0
    assert _function_settings(control)["max_containers"] == 10


def test_by_hand_deploy_reads_replicas_from_the_environment():
    from modal_apps import vllm_arm

    spec = vllm_arm.ArmSpec.from_environment({
        "GUIDED_AB_MODAL_MIN_CONTAINERS": "0", "GUIDED_AB_MODAL_MAX_CONTAINERS": "4", "GUIDED_AB_MODAL_TARGET_INPUTS": "6",
    })
    assert (spec.replicas.min_containers, spec.replicas.max_containers, spec.replicas.target_inputs) == (0, 4, 6)
    with pytest.raises(ValueError, match="min_containers 5 is above max_containers 4"):
        vllm_arm.ArmSpec.from_environment({"GUIDED_AB_MODAL_MIN_CONTAINERS": "5", "GUIDED_AB_MODAL_MAX_CONTAINERS": "4"})


def test_dry_run_counts_the_warm_containers_and_states_the_most(tmp_path):
    from guided_ab.dry_run import describe_plan, plan_experiment

    cfg = _config(tmp_path, auto={"min_containers": 2, "max_containers": 5, "target_inputs": 8})
    plan = {a.arm: a for a in plan_experiment(cfg, run_id=RUN_ID).arms}
    s = cfg.arm("auto").modal
    assert plan["auto"].cost_per_hour == pytest.approx(2 * s.cost_per_hour)
    assert plan["guidance"].cost_per_hour == pytest.approx(cfg.arm("guidance").modal.cost_per_hour)
    text = describe_plan(cfg, run_id=RUN_ID)
    assert "2 held warm from deploy to teardown (min_containers), up to 5 under load" in text
    assert "autoscaler target 8 inputs per container" in text
    assert f"with all 5 (max_containers) up all the time: ${plan['auto'].held_s / 3600 * 5 * s.cost_per_hour:.2f}" in text
    assert "1 held warm from deploy to teardown (min_containers), at most 1 (max_containers): no autoscaling" in text


# -- bad settings are refused, naming the field ------------------------------------------------
@pytest.mark.parametrize("replicas, where, what", [
    ({"min_containers": 3, "max_containers": 2}, "arms.1.modal.replicas", "min_containers 3 is above max_containers 2"),
    ({"max_containers": 0}, "arms.1.modal.replicas.max_containers", "greater than or equal to 1"),
    ({"min_containers": -1}, "arms.1.modal.replicas.min_containers", "greater than or equal to 0"),
    ({"target_inputs": 0}, "arms.1.modal.replicas.target_inputs", "greater than or equal to 1"),
    ({"target_inputs": 2.5}, "arms.1.modal.replicas.target_inputs", "integer"),
    ({"target_inputs": 64}, "arms.1.modal", "replicas.target_inputs 64 is above max_concurrent_inputs 32"),
    ({"max_containers": True}, "arms.1.modal.replicas.max_containers", "not a boolean"),
    ({"max_replicas": 2}, "arms.1.modal.replicas.max_replicas", "unknown field"),
])
def test_bad_replica_settings_are_refused_naming_the_field(replicas, where, what):
    data = load_config(CONFIG).model_dump(mode="json")
    data["arms"][1]["modal"]["replicas"] = replicas
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.yaml")
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith(where + ":"))
    assert what in line, str(err.value)


def test_the_cli_refuses_bad_replicas_before_anything_starts(tmp_path):
    text = CONFIG.read_text()
    assert "      max_concurrent_inputs: 32\n" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("      max_concurrent_inputs: 32\n",
                                "      max_concurrent_inputs: 32\n      replicas: {min_containers: 4, max_containers: 2}\n", 1))
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "guided-ab"), "run", str(bad), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "arms.0.modal.replicas" in proc.stderr and "min_containers 4 is above max_containers 2" in proc.stderr
    assert "Dry run" not in proc.stdout


# -- which container served each request -------------------------------------------------------
def test_header_names_match():
    assert attribution.SERVED_BY_HEADER.decode() == SERVED_BY_HEADER
    assert attribution.HEADER.decode() == ATTRIBUTION_HEADER


def test_container_is_modal_task_id_else_host_and_pid():
    assert attribution.served_by({"MODAL_TASK_ID": "ta-01JXYZ"}) == "ta-01JXYZ"
    assert attribution.served_by({}) == f"{socket.gethostname()}:{os.getpid()}"


SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}


def _chat_app(delay_s: float):
    """A tiny OpenAI-style chat server (one 'container's vLLM'): a schema-valid answer after delay_s."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(delay_s)
        body = json.dumps({"choices": [{"message": {"content": json.dumps({"id": "x"})}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    return app


def _container(task_id: str | None, delay_s: float, monkeypatch):
    """The attribution middleware as vLLM builds it inside one container (MODAL_TASK_ID set by Modal)."""
    if task_id:
        monkeypatch.setenv("MODAL_TASK_ID", task_id)
    else:
        monkeypatch.delenv("MODAL_TASK_ID", raising=False)
    return attribution.BackendAttributionMiddleware(_chat_app(delay_s))


def _router(arms: dict[str, list]):
    """Modal's web router, in miniature: /<arm>/... goes round-robin to that arm's containers."""
    turn = {a: 0 for a in arms}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        arm, _, rest = scope["path"].lstrip("/").partition("/")
        containers = arms[arm]
        container = containers[turn[arm] % len(containers)]
        turn[arm] += 1
        await container({**scope, "path": "/" + rest}, receive, send)
    return app


@pytest.fixture()
def replica_server(monkeypatch):
    import uvicorn

    containers = {"a": [_container("ta-fast", 0.01, monkeypatch), _container("ta-slow", 0.3, monkeypatch)],
                  "b": [_container(None, 0.01, monkeypatch)]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_router(containers), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "loopback server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_container_that_served_each_request_is_recorded(replica_server, tmp_path):
    items = [WorkItem(schema_id=f"s{i:02d}", subset="smoke", prompt=f"request {i}", json_schema=SCHEMA) for i in range(12)]
    plan = make_plan("ab", ["a", "b"], items, seed=3)
    store = RunStore(tmp_path, "replicas")
    store.path("records").mkdir(parents=True, exist_ok=True)
    endpoints = {a: Endpoint(run_id="replicas", arm=a, target="external", base_url=f"{replica_server}/{a}",
                             model="m", backend="guidance") for a in ("a", "b")}
    result = asyncio.run(run_plan(plan, endpoints, store, Workload(concurrency=1, max_tokens=20, timeout_s=30)))
    assert dict(result.outcomes) == {"success": 24}

    records = store.journal("ab")
    by_arm: dict[str, list[str | None]] = {"a": [], "b": []}
    for r in sorted(records, key=lambda r: r.order_index):
        by_arm[r.arm].append(r.served_by)
    # one at a time, so arm a's router alternates: every record names the container that answered
    assert by_arm["a"] == ["ta-fast", "ta-slow"] * 6
    assert by_arm["b"] == [f"{socket.gethostname()}:{os.getpid()}"] * 12  # no MODAL_TASK_ID: host and pid
    # and the records keep it: the parquet, read back
    store.finalize_records("ab")
    frame = store.records(("ab",))
    assert sorted(frame[frame["arm"] == "a"]["served_by"].unique()) == ["ta-fast", "ta-slow"]

    # the slow container is seen in the report; arm b had one container: no rows for it
    model = build_report(load_config(CONFIG).model_copy(update={"arms": [
        modal_arm(name="a", role="control"), modal_arm(name="b")]}), {}, {}, "replicas", frame)
    rows = {(r.arm, r.container): r for r in model.replicas}
    assert set(rows) == {("a", "ta-fast"), ("a", "ta-slow")}
    assert rows[("a", "ta-slow")].slow and not rows[("a", "ta-fast")].slow
    assert rows[("a", "ta-slow")].requests == rows[("a", "ta-fast")].requests == 6
    assert rows[("a", "ta-slow")].p50 > 0.3 > rows[("a", "ta-fast")].p50


def test_refusals_name_their_container_too():
    """A 4xx (here a workload refusal, which carries no backend) still names the container."""
    async def refuse(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "maximum context length is 4096"}}'})

    body = json.dumps({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}).encode()
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    middleware = attribution.BackendAttributionMiddleware(refuse)
    middleware.served_by = b"ta-7"
    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send))
    headers = dict(sent[0]["headers"])
    assert headers[attribution.SERVED_BY_HEADER] == b"ta-7" and attribution.HEADER not in headers


def test_records_written_before_the_field_still_read():
    line = {"run_id": "r", "phase": "ab", "arm": "a", "request_id": "ab-0", "schema_id": "s", "subset": "x",
            "order_index": 0, "pair_index": 0, "warmup": False, "first_for_schema": True, "stream": False,
            "attempt": 1, "sent_at": 1.0, "outcome": "success"}
    assert RequestRecord.model_validate_json(json.dumps(line)).served_by is None


# -- the report ----------------------------------------------------------------------------------
def _finished_run(root: Path, containers: dict[str, list[str]], slow: str | None = None, *, decide: bool = True) -> RunStore:
    """A finished run of synthetic records; each arm's requests spread over its containers in
    turn, the `slow` one's latencies doubled."""
    turn = {a: 0 for a in containers}

    def spread_over_containers(row: dict) -> dict:
        names = containers[row["arm"]]
        row["served_by"] = names[turn[row["arm"]] % len(names)]
        turn[row["arm"]] += 1
        if row["served_by"] == slow and row["latency_s"] is not None:
            row["latency_s"] *= 2
        return row

    return make_finished_run(root, "replicas-run", pairs=40, ratio=0.9, seed=5, observe=4, bootstrap_resamples=100,
                             decide=decide, edit_row=spread_over_containers)


def test_report_shows_latency_per_replica_and_marks_the_slow_one(tmp_path):
    store = _finished_run(tmp_path / "runs", {"guidance": ["ta-g1"], "auto": ["ta-a1", "ta-a2"]}, slow="ta-a2")
    cfg = store.load_config()
    write_reports(store, cfg, store.read_json("evaluation.json"), store.read_json("decision.json"))
    md = store.path("report.md").read_text()
    section = md.split("## Per-replica latency", 1)[1].split("\n## ", 1)[0]
    lines = [x for x in section.splitlines() if x.startswith("| auto")]
    assert len(lines) == 2 and "ta-a1" in lines[0] and "ta-a2" in lines[1]
    assert "(slow)" in lines[1] and "(slow)" not in lines[0] and "ta-g1" not in section
    html = store.path("report.html").read_text()
    assert 'data-testid="replicas-table"' in html and "ta-a2" in html and "(slow)" in html


def test_report_has_no_replica_section_when_every_arm_had_one_container(tmp_path):
    store = _finished_run(tmp_path / "runs", {"guidance": ["ta-g1"], "auto": ["ta-a1"]})
    write_reports(store, store.load_config(), store.read_json("evaluation.json"), store.read_json("decision.json"))
    assert "Per-replica" not in store.path("report.md").read_text()
    assert "replicas-table" not in store.path("report.html").read_text()


def test_requests_without_an_answer_are_grouped_apart(tmp_path):
    store = _finished_run(tmp_path / "runs", {"guidance": ["ta-g1"], "auto": ["ta-a1", "ta-a2", None]},  # type: ignore[list-item]
                          decide=False)
    model = build_report(store.load_config(), {}, {}, store.run_id, store.records())
    assert [r.container for r in model.replicas] == sorted(["ta-a1", "ta-a2", NO_CONTAINER])
