"""Run our load generator (guided_ab.runner.run_plan, the product's request path) once, in its own
process, against an OpenAI-compatible endpoint, and write what it recorded as JSON.

Used by bench/loadgen_vs_guidellm.py (one process per scenario, so its CPU is measured alone);
also runnable by hand:

    python bench/ours_worker.py --url http://127.0.0.1:8765 --requests 500 --concurrency 16 --out /tmp/o.json

The plan has one arm and `--requests` distinct schema items (all `{"type": "object"}`, the
loopback server's answers validate), so every request goes through chat_body, send_chat,
classify, a RequestRecord and the fsync'd journal, exactly as in an experiment phase.
`--rate R` sends with Poisson arrivals at R requests/s (open loop, `--concurrency` caps what is
in flight). `--impl DIR` imports `guided_ab` from DIR first (e.g. an older checkout, to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("Benchmark request {i}: describe the weather in one short JSON object. " * 4).strip()


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="loopback")
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--impl", default=None, help="import guided_ab from this directory first")
    ap.add_argument("--store", default=None, help="run store root (default: a temporary directory)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    if a.impl:
        sys.path.insert(0, str(Path(a.impl).resolve()))

    import guided_ab
    from guided_ab.config import Workload
    from guided_ab.plan import make_plan
    from guided_ab.runner import run_plan
    from guided_ab.store import RunStore
    from guided_ab.targets.base import Endpoint
    from guided_ab.workload import WorkItem

    schema = {"type": "object"}
    items = [WorkItem(schema_id=f"s{i:06d}", subset="bench", prompt=PROMPT.format(i=i), json_schema=schema)
             for i in range(a.requests)]
    plan = make_plan("ab", ["lb"], items, seed=a.seed)
    wl = Workload(concurrency=a.concurrency, max_tokens=a.max_tokens, timeout_s=60, stream_share=1.0,
                  temperature=0.0)
    endpoints = {"lb": Endpoint(run_id="bench", arm="lb", target="external", base_url=a.url, model=a.model,
                                backend="loopback")}
    root = a.store or tempfile.mkdtemp(prefix="guided-ab-bench-")
    store = RunStore(root, f"bench-{os.getpid()}-{int(time.time())}")
    (store.dir / "records").mkdir(parents=True, exist_ok=True)

    kwargs = {}
    if a.rate:
        rng = random.Random(a.seed)
        t, arrivals = 0.0, []
        for _ in plan.requests:
            t += rng.expovariate(a.rate)
            arrivals.append(t)
        kwargs["arrivals"] = arrivals

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        import asyncio

        runner = asyncio.run
    cpu0, wall0, t_start = _cpu(), time.perf_counter(), time.time()
    result = runner(run_plan(plan, endpoints, store, wl, **kwargs))
    wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    t_stop = time.time()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = []
    for r in store.journal("ab"):
        rid = None
        if r.output:
            try:
                rid = json.loads(r.output).get("id")
            except (ValueError, AttributeError):
                rid = None
        rows.append({"id": rid, "ttft_s": r.ttft_s, "latency_s": r.latency_s, "outcome": r.outcome,
                     "sent_at": r.sent_at, "error": r.error})
    out = {
        "tool": "ours", "impl": str(Path(guided_ab.__file__).parent), "planned": result.planned,
        "recorded": result.recorded, "outcomes": dict(result.outcomes), "wall_s": wall, "cpu_s": cpu,
        "t_start": t_start, "t_stop": t_stop, "maxrss_mb": maxrss_mb, "requests": rows,
    }
    Path(a.out).write_text(json.dumps(out))
    if not a.store:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
