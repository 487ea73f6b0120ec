"""Production canary: a small workload against the serving endpoint, compared with a stored baseline.

The seed's Phase 3 ("monitor for 1 week after switching") as a scheduled job: each canary run
sends `size` fresh schemas to the production endpoint, records them like any phase, and checks
the pre-registered guardrails of the baseline experiment against the arm that experiment chose:
- success: breach when the canary's Wilson upper bound is below baseline rate - success_margin
  (the canary is clearly worse, not just noisy);
- latency: breach when the canary's p50 lower bound (bootstrap) exceeds baseline p50 x (1 + latency_margin).
"""

from __future__ import annotations

import random
import time

import numpy as np

from guided_ab.analysis import stats as S
from guided_ab.analysis.bootstrap import bootstrap_quantile_draws, percentile_interval
from guided_ab.arms import external
from guided_ab.arms.vllm_args import SERVED_MODEL_NAME
from guided_ab.config import ConfigError
from guided_ab.errors import GuardrailBreach as GuardrailBreach  # defined here before guided_ab.errors
from guided_ab.load.runner import run_plan
from guided_ab.phases import load_endpoints, save_endpoints
from guided_ab.plan import make_plan
from guided_ab.store import RunStore
from guided_ab.workload import load_workload


def run_canary(
    baseline: RunStore, *, url: str, api_key_env: str | None = None, arm: str | None = None,
    model: str = SERVED_MODEL_NAME, size: int = 10, seed: int | None = None,
) -> dict:
    """Send the canary, write canary.json in a new run directory, return the checks."""
    import asyncio

    cfg = baseline.load_config()
    evaluation = baseline.read_json("evaluation.json")
    decision = baseline.read_json("decision.json")
    arm_name = arm or decision.get("serve") or cfg.control.name
    if arm_name not in evaluation.get("arms", {}):
        raise ConfigError(f"arm {arm_name!r} has no results in baseline run {baseline.run_id}")
    seed = seed if seed is not None else int(time.time())
    wl = cfg.workload.model_copy(update={"size": size, "observe_size": 0, "seed": seed})
    store = RunStore.create(cfg.model_copy(update={"workload": wl}), f"{baseline.run_id}-canary-{time.strftime('%Y%m%d-%H%M%S')}")
    ep = external.endpoint(
        run_id=store.run_id, arm=arm_name, url=url, model=model, backend=cfg.arm(arm_name).backend, api_key_env=api_key_env,
    )
    save_endpoints(store, {arm_name: ep})
    items = random.Random(seed).sample(load_workload(wl), size)
    plan = make_plan("canary", [arm_name], items, seed=seed, stream_share=wl.stream_share)
    store.write_json("plan-canary.json", plan.model_dump())
    asyncio.run(run_plan(plan, load_endpoints(store), store, wl))
    store.finalize_records("canary")
    df = store.records(("canary",))
    checks = compare_with_baseline(df, evaluation["arms"][arm_name], cfg.decision)
    result = {"baseline_run": baseline.run_id, "arm": arm_name, "url": ep.base_url, "n": len(df), "checks": checks,
              "breached": [c["name"] for c in checks if c["breach"]]}
    store.write_json("canary.json", result)
    result["run_id"] = store.run_id
    return result


def compare_with_baseline(df, base_arm: dict, rule) -> list[dict]:
    n = len(df)
    succ = int((df["outcome"] == "success").sum())
    rate = S.wilson(succ, n, rule.alpha)
    base_rate = (base_arm.get("success", {}).get("rate") or {}).get("estimate")
    checks = []
    if base_rate is not None:
        floor = base_rate - rule.success_margin
        checks.append({
            "name": "success", "canary": rate.estimate, "ci_high": rate.ci_high, "baseline": base_rate, "threshold": floor,
            "breach": rate.ci_high is not None and rate.ci_high < floor,
            "detail": f"canary success {succ}/{n} (upper bound {rate.ci_high:.1%}) vs baseline {base_rate:.1%} - margin {rule.success_margin:.0%}",
        })
    lat = np.sort(df.loc[df["outcome"] == "success", "latency_s"].dropna().to_numpy(dtype=float))
    base_p50 = (base_arm.get("latency", {}).get("p50") or {}).get("estimate")
    if base_p50 is not None and lat.size >= 3:
        draws = bootstrap_quantile_draws(lat, 0.5, 2000, np.random.default_rng(0))
        p50 = percentile_interval(float(np.median(lat)), draws, rule.alpha)
        ceiling = base_p50 * (1 + rule.latency_margin)
        checks.append({
            "name": "latency_p50", "canary": p50.estimate, "ci_low": p50.ci_low, "baseline": base_p50, "threshold": ceiling,
            "breach": p50.ci_low is not None and p50.ci_low > ceiling,
            "detail": f"canary p50 {p50.estimate:.2f} s (lower bound {p50.ci_low:.2f}) vs baseline {base_p50:.2f} s + {rule.latency_margin:.0%}",
        })
    return checks
