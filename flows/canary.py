"""Production canary (scheduled daily in prefect.yaml): a small workload against the serving
endpoint compared with a stored baseline run; a guardrail breach fails the flow run."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from guided_ab.canary import GuardrailBreach, run_canary
from guided_ab.store import RunStore

from ._common import DEFAULT_STORE


@flow(name="canary", log_prints=True)
def canary(
    baseline_run_id: str, url: str, api_key_env: str | None = None, arm: str | None = None,
    size: int = 10, store: str = DEFAULT_STORE,
) -> dict:
    result = run_canary(RunStore.open(store, baseline_run_id), url=url, api_key_env=api_key_env, arm=arm, size=size)
    lines = [f"| {c['name']} | {c['detail']} | {'**BREACH**' if c['breach'] else 'ok'} |" for c in result["checks"]]
    verdict = "GUARDRAIL BREACH: " + ", ".join(result["breached"]) if result["breached"] else "healthy"
    create_markdown_artifact(
        f"# Canary vs baseline `{baseline_run_id}`: {verdict}\n\nArm `{result['arm']}` at {result['url']}, "
        f"{result['n']} requests (run `{result['run_id']}`).\n\n| check | detail | verdict |\n|---|---|---|\n" + "\n".join(lines),
        key="guided-ab-canary", description=verdict,
    )
    get_run_logger().info(f"canary: {verdict}")
    if result["breached"]:
        raise GuardrailBreach(f"canary breached {result['breached']}: " + "; ".join(c["detail"] for c in result["checks"] if c["breach"]))
    return result
