"""Publish a run's results as Prefect artifacts (keys stable per experiment name); never cached:
a re-decided run must publish its new decision."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from guided_ab.reports.markdown import artifact_markdown
from guided_ab.reports.model import arm_rows, criteria_rows
from guided_ab.store import RunStore


@task(name="publish-results", cache_policy=NO_CACHE, timeout_seconds=15 * 60)
def publish_results(store: RunStore) -> list[str]:
    cfg = store.load_config()
    evaluation = store.read_json("evaluation.json")
    decision = store.read_json("decision.json")
    key = cfg.name
    desc = f"run {store.run_id}: {decision['verdict']}"
    ids = [
        # report.md with the key plots inlined (data URIs): the Prefect UI shows them in the artifact
        create_markdown_artifact(artifact_markdown(store.dir if store.location == str(store.dir) else store), key=f"{key}-report", description=desc),
        create_table_artifact(arm_rows(evaluation), key=f"{key}-arms", description=f"per-arm results, {desc}"),
        create_table_artifact(criteria_rows(decision) or [{"criterion": "none"}], key=f"{key}-criteria", description=desc),
        create_table_artifact(
            [{"arm": arm, **a.get("outcomes", {})} for arm, a in evaluation.get("arms", {}).items()],
            key=f"{key}-failure-classes", description=f"outcome classes per arm, {desc}",
        ),
    ]
    for name in ("report.html", "report.md", "decision.json", "evaluation.json"):
        if store.has(name):
            what = "the full report with plots, one self-contained file; " if name == "report.html" else ""
            ids.append(create_link_artifact(
                store.uri(name), link_text=f"{name} ({store.run_id})",
                key=f"{key}-{name.replace('.', '-')}",
                description=f"{desc}: {what}open it on the machine holding the run store (`guided-ab report {store.run_id} --open`)",
            ))
    return [str(i) for i in ids]
