"""The production canary against a stored baseline: one record per canary request, and a
guardrail breach (here: every answer is wrong) named in canary.json and raised by the flow."""

from __future__ import annotations

from synthetic_run import make_finished_run

from guided_ab.canary import run_canary
from guided_ab.selfcheck.fault_server import FaultServer

KEY = "canary-test-key-0123456789"


def test_canary_records_every_request_and_flags_a_success_breach(tmp_path, monkeypatch):
    baseline = make_finished_run(tmp_path / "runs", "baseline-run", pairs=120, ratio=1.0)
    monkeypatch.setenv("CANARY_KEY", KEY)
    with FaultServer("wrong", api_key=KEY) as srv:  # answers that never match the schema
        result = run_canary(baseline, url=srv.url, api_key_env="CANARY_KEY", arm="guidance", size=12, seed=3)
    assert result["n"] == 12
    assert "success" in result["breached"], result["checks"]
    canary = baseline.open(baseline.root, result["run_id"])
    assert len(canary.records(("canary",))) == 12
    assert canary.read_json("canary.json")["breached"] == result["breached"]
    assert KEY not in "".join(p.read_text(errors="ignore") for p in canary.dir.rglob("*") if p.is_file() and p.suffix != ".parquet")
