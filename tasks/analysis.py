"""Tasks that evaluate a run's records and apply the pre-registered decision rule."""

from __future__ import annotations

from prefect import get_run_logger, task

from guided_ab import phases
from guided_ab.config import DecisionOverrides
from guided_ab.store import RunStore


@task(name="evaluate")
def evaluate_run(store: RunStore, thresholds: DecisionOverrides | None = None) -> dict:
    evaluation = phases.evaluate_run(store, thresholds)
    gates = evaluation.get("gates", [])
    failed = [g["name"] for g in gates if not g.get("passed")]
    get_run_logger().info(f"evaluated run {store.run_id}: {len(gates)} validity gates, failed: {failed or 'none'}")
    return evaluation


@task(name="decide")
def decide_run(store: RunStore, thresholds: DecisionOverrides | None = None) -> dict:
    decision = phases.decide_run(store, thresholds)
    get_run_logger().info(f"decision for run {store.run_id}: {decision['verdict']} — " + "; ".join(decision.get("reasons", [])))
    return decision
