"""The HTML report and the Prefect UI, checked in a real (headless) Chromium.

A finished run is built without vLLM: the real plan of a small config, one simulated record per
planned request written through the real RunStore, then the real evaluate and decide phases
(which write report.md, report.html and the key-plot PNGs). Then:

1. report.html is served over http on 127.0.0.1 and opened: the decision banner, criteria, every
   plot and the gates render, and the page loads nothing but itself (self-contained).
2. A real `prefect server start` (temporary PREFECT_HOME) receives the run's artifacts from a tiny
   flow in a subprocess; the flow run's Artifacts tab lists the report, and the report artifact
   shows the markdown with the latency plot image.

Screenshots go to test-output/ (git-ignored). Needs Debian's `chromium` (scripts/install.sh
--test installs it) and the `playwright` package; never downloads a browser.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "test-output"

_spec = importlib.util.spec_from_file_location("report_screenshot", REPO / "scripts" / "report_screenshot.py")
report_screenshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_screenshot)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(report_screenshot.chromium_path() is None,
                       reason="no Chromium at /usr/bin/chromium: `bash scripts/install.sh --test` installs Debian's "
                              "chromium (or set GUIDED_AB_CHROMIUM)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright package is missing: `bash scripts/install.sh --test`"),
]

PLOTS = ("plot-latency-cdf", "plot-outcomes", "plot-subset-failures", "plot-backend", "plot-drift", "plot-cost")


# -- helpers ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


def _db_template() -> Path:
    """An empty, migrated Prefect database kept between sessions (a fresh one costs ~20 s of CPU)."""
    from importlib.metadata import version

    cache = Path(os.environ.get("GUIDED_AB_CACHE") or Path.home() / ".cache" / "guided-ab")
    return cache / f"prefect-{version('prefect')}-empty.db"


class PrefectServer:
    """`prefect server start` in its own process group and PREFECT_HOME; started early, waited late."""

    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        self.db = home / "prefect.db"
        self.template = _db_template()
        self.from_template = self.template.is_file()
        if self.from_template:
            shutil.copyfile(self.template, self.db)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"{self.url}/api", "PREFECT_UI_API_URL": f"{self.url}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        self.log = home / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def wait(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if _get(f"{self.url}/api/health") == 200:
                if not self.from_template:
                    self._save_template()
                return
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def _save_template(self) -> None:
        """Keep the freshly migrated, still empty database (SQLite's online backup: safe while served)."""
        try:
            self.template.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.template.with_suffix(f".{os.getpid()}.tmp")
            src, dst = sqlite3.connect(self.db), sqlite3.connect(tmp)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            os.replace(tmp, self.template)
        except (OSError, sqlite3.Error):
            pass  # only a cache

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group only
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def build_finished_run(root: Path):
    """A finished two-arm run (guidance vs auto) from simulated records of the real plan."""
    from guided_ab import phases
    from guided_ab.config import Arm, DecisionRule, ExperimentConfig, Workload
    from guided_ab.records import RequestRecord
    from guided_ab.store import RunStore

    cfg = ExperimentConfig(
        name="browser-check",
        description="Simulated run for the browser test: guidance (control) vs auto (candidate), 48 paired "
                    "function-signature schemas, 8 observe-only requests.",
        arms=[Arm(name="guidance", role="control", backend="guidance", target="modal"),
              Arm(name="auto", role="candidate", backend="auto", target="modal")],
        workload=Workload(suite="functions", size=48, observe_size=8, warmup=1, stream_share=1.0),
        decision=DecisionRule(bootstrap_resamples=400),
        store=str(root),
    )
    store = RunStore.create(cfg, "browser-check-run")
    plans = phases.build_plans(cfg, store)
    rng = np.random.default_rng(20251027)
    schema_effect: dict[str, float] = {}
    t = 1.8e9
    for phase in ("observe", "ab"):
        plan = plans[phase]
        for r in plan.requests:
            item = plan.items[r.schema_id]
            feats = json.dumps(item.json_schema)
            hard = any(k in feats for k in ('"uniqueItems"', '"multipleOf"', '"patternProperties"'))
            backend = r.arm if r.arm != "auto" else ("guidance" if hard else "xgrammar")
            eff = schema_effect.setdefault(r.schema_id, float(rng.normal(0, 0.35)))
            lat = float(np.exp(np.log(3.2) + eff + rng.normal(0, 0.2))) * (0.78 if backend == "xgrammar" else 1.0)
            lat *= 1.0 + 0.08 * (t - 1.8e9) / 600  # a little drift, on both arms alike
            u = rng.random()
            if r.warmup:
                outcome = "success"
            elif r.arm == "guidance" and '"uniqueItems"' in feats:
                outcome = "rejected"
            else:
                outcome = ("success" if u < 0.9 else "truncated" if u < 0.94 else "schema_violation" if u < 0.98
                           else "timeout")
            answered = outcome not in ("rejected", "timeout")
            latency = lat if answered else (0.05 if outcome == "rejected" else 30.0)
            store.append_record(RequestRecord(
                run_id=store.run_id, phase=r.phase, arm=r.arm, request_id=r.request_id, schema_id=r.schema_id,
                subset=item.subset, order_index=r.order_index, pair_index=r.pair_index, warmup=r.warmup,
                first_for_schema=r.first_for_schema, stream=r.stream, attempt=1, sent_at=t,
                ttft_s=lat * float(rng.uniform(0.08, 0.2)) if answered else None,
                latency_s=latency if outcome != "timeout" else None,
                prompt_tokens=300, completion_tokens=int(rng.integers(20, 120)) if answered else None,
                finish_reason=("length" if outcome == "truncated" else "stop") if answered else None,
                http_status=400 if outcome == "rejected" else (None if outcome == "timeout" else 200),
                backend=backend, outcome=outcome,
                error='Grammar error: Unimplemented keys: ["uniqueItems"]' if outcome == "rejected" else None,
            ))
            t += latency
        store.finalize_records(phase)
    held = t - 1.8e9 + 240
    store.write_json("teardown.json", {"arms": [
        {"arm": a.name, "target": "modal", "stopped": True, "held_s": held, "cost_usd": round(held / 3600 * 3.95, 4)}
        for a in cfg.arms
    ], "at": t})
    phases.evaluate_run(store)
    phases.decide_run(store)
    return store


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server") / "home")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_server):
    # depends on prefect_server only so that its database migrations run while the run is built
    return build_finished_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = report_screenshot.launch(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def http_root(finished_run):
    handler = functools.partial(_QuietHandler, directory=str(finished_run.dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# -- tests -----------------------------------------------------------------------------------------
def test_html_report_renders_in_chromium(finished_run, http_root, browser):
    from guided_ab.reports.format import VERDICT_TEXT

    decision = finished_run.read_json("decision.json")
    evaluation = finished_run.read_json("evaluation.json")
    for name in ("report.html", "report.md", "latency_cdf.png", "outcomes.png"):
        assert finished_run.path(name).is_file(), name
    assert "](latency_cdf.png)" in finished_run.path("report.md").read_text()

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    url = f"{http_root}/report.html"
    page.goto(url, wait_until="load")

    banner = page.locator("#decision")
    banner.wait_for(state="visible")
    assert banner.get_attribute("data-verdict") == decision["verdict"]
    assert VERDICT_TEXT[decision["verdict"]] in banner.inner_text()
    assert banner.locator(".reasons li").count() == max(1, len(decision["reasons"]))
    assert page.locator("#criteria-table tbody tr").count() == len(decision["criteria"])
    assert page.locator("#gates tbody tr").count() == len(evaluation["gates"])
    assert page.locator("#arms .card").count() == len(evaluation["arms"])
    assert page.locator("#cost tbody tr").count() == len(evaluation["arms"])
    for pid in PLOTS:
        svg = page.locator(f"#{pid} svg")
        assert svg.count() == 1, f"{pid}: no plot ({page.locator('#' + pid).inner_text()[:200]})"
        box = svg.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 80, (pid, box)
    # the latency CDF shows one line per arm in its legend
    legend = page.locator("#plot-latency-cdf").inner_text()
    assert all(arm in legend for arm in evaluation["arms"]), legend
    # self-contained: nothing but the page itself was fetched
    assert [u for u in requested if not u.startswith("data:")] == [url]

    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / "report.png"), full_page=True)
    banner.screenshot(path=str(OUT / "report-decision.png"))
    page.locator("#plot-latency-cdf").screenshot(path=str(OUT / "report-latency-cdf.png"))
    page.close()
    assert (OUT / "report.png").stat().st_size > 20_000


PUBLISH = """
import sys
from prefect import flow
from prefect.runtime import flow_run
from guided_ab.store import RunStore
from tasks.artifacts import publish_results

@flow(name="publish-report")
def publish(root: str, run_id: str) -> str:
    publish_results(RunStore.open(root, run_id))
    return str(flow_run.id)

print("FLOW_RUN_ID=" + publish(sys.argv[1], sys.argv[2]))
"""


def test_prefect_ui_shows_the_report_artifacts(finished_run, prefect_server, browser):
    cfg = finished_run.load_config()
    decision = finished_run.read_json("decision.json")
    prefect_server.wait()
    env = {**prefect_server.env, "PREFECT_HOME": str(Path(prefect_server.log).parent / "client"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", PUBLISH, str(finished_run.root), finished_run.run_id],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    flow_run_id = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLOW_RUN_ID=")][-1].split("=", 1)[1]

    OUT.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{prefect_server.url}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")
    page.get_by_text("publish-report", exact=False).first.wait_for(timeout=30_000)
    page.get_by_role("tab", name="Artifacts").or_(page.get_by_text("Artifacts", exact=True)).first.click()
    report_key = f"{cfg.name}-report"
    card = page.get_by_text(report_key, exact=True).first
    card.wait_for(timeout=30_000)
    for key in (f"{cfg.name}-arms", f"{cfg.name}-criteria", f"{cfg.name}-report-html"):
        assert page.get_by_text(key, exact=True).count() >= 1, key
    page.screenshot(path=str(OUT / "prefect-flow-run-artifacts.png"))

    # the report artifact: markdown rendered with the verdict and the latency plot as an image
    card.click()
    page.get_by_role("heading", name=cfg.name, exact=False).first.wait_for(timeout=30_000)
    img = page.locator("img[src^='data:image/png']").first
    img.wait_for(timeout=15_000)
    page.screenshot(path=str(OUT / "prefect-report-artifact.png"))
    img.scroll_into_view_if_needed()
    assert page.evaluate("(e) => e.naturalWidth", img.element_handle()) > 100
    assert decision["verdict"].upper() in page.content().upper()
    page.screenshot(path=str(OUT / "prefect-report-artifact-plots.png"))
    page.close()
