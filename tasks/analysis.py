"""Tasks that evaluate a run's records and apply the pre-registered decision rule.

Never cached (NO_CACHE): they write evaluation.json, decision.json and the reports, which a
retry must write again."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from guided_ab import phases
from guided_ab.config import DecisionOverrides
from guided_ab.store import RunStore


@task(name="evaluate", cache_policy=NO_CACHE, timeout_seconds=60 * 60)
def evaluate_run(store: RunStore, thresholds: DecisionOverrides | None = None) -> dict:
    evaluation = phases.evaluate_run(store, thresholds)
    gates = evaluation.get("gates", [])
    failed = [g["name"] for g in gates if not g.get("passed")]
    get_run_logger().info(f"evaluated run {store.run_id}: {len(gates)} validity gates, failed: {failed or 'none'}")
    return evaluation


@task(name="decide", cache_policy=NO_CACHE, timeout_seconds=30 * 60)
def decide_run(store: RunStore, thresholds: DecisionOverrides | None = None) -> dict:
    decision = phases.decide_run(store, thresholds)
    get_run_logger().info(f"decision for run {store.run_id}: {decision['verdict']} — " + "; ".join(decision.get("reasons", [])))
    return decision
