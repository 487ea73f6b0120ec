"""Run our load generator (guided_ab.load.runner.run_plan, the product's request path) once, in its own
process, against an OpenAI-compatible endpoint, and write what it recorded as JSON.

Used by bench/loadgen_vs_guidellm.py (one process per scenario, so its CPU is measured alone);
also runnable by hand:

    python bench/ours_worker.py --url http://127.0.0.1:8765 --requests 500 --concurrency 16 --out /tmp/o.json

The plan has one arm and `--requests` distinct schema items (all `{"type": "object"}`, the
loopback server's answers validate), so every request goes through chat_body, send_chat,
classify, a RequestRecord and the fsync'd journal, exactly as in an experiment phase.
`--rate R` sends with Poisson arrivals at R requests/s (open loop, `--concurrency` caps what is
in flight). `--impl DIR` imports `guided_ab` from DIR first (e.g. an older checkout, to compare).

`--memory N` instead measures memory for N requests: it writes an N-record journal (two arms),
runs run_plan on that phase (everything recorded: the resume bookkeeping) and reports the peak
RSS, then, in a fresh process, the peak RSS of loading the N records as a DataFrame
(RunStore.records, what evaluate reads).
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


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory(n: int, out: Path) -> None:
    import subprocess

    from guided_ab.arms.base import Endpoint
    from guided_ab.config import Workload
    from guided_ab.load.runner import run_plan
    from guided_ab.plan import make_plan
    from guided_ab.records import RequestRecord
    from guided_ab.store import RunStore
    from guided_ab.workload import WorkItem

    root = tempfile.mkdtemp(prefix="guided-ab-memory-")
    try:
        schema = {"type": "object", "properties": {"id": {"type": "string"}}}
        items = [WorkItem(schema_id=f"s{i:06d}", subset="bench", prompt=PROMPT.format(i=i), json_schema=schema)
                 for i in range((n + 1) // 2)]
        plan = make_plan("ab", ["a", "b"], items, seed=1)
        store = RunStore(root, "memory")
        output = json.dumps({"id": "chatcmpl-lb0", "pad": "tok " * 16})

        async def write_journal() -> None:  # through the store's journal writer, as a phase writes it
            journal = store.open_journal("ab")
            try:
                for r in plan.requests:
                    journal.append(RequestRecord(
                        run_id="memory", phase="ab", arm=r.arm, request_id=r.request_id, schema_id=r.schema_id,
                        subset="bench", order_index=r.order_index, pair_index=r.pair_index, warmup=r.warmup,
                        first_for_schema=r.first_for_schema, stream=True, attempt=1, sent_at=time.time(), ttft_s=0.01,
                        latency_s=0.1, prompt_tokens=70, completion_tokens=20, finish_reason="stop", http_status=200,
                        backend="loopback", outcome="success", output=output,
                    ))
            finally:
                await journal.close()

        import asyncio

        asyncio.run(write_journal())
        endpoints = {arm: Endpoint(run_id="memory", arm=arm, target="external", base_url="http://127.0.0.1:9",
                                   model="m", backend="x") for arm in ("a", "b")}
        result = asyncio.run(run_plan(plan, endpoints, store, Workload(concurrency=64)))
        assert result.recorded == len(plan.requests) and result.sent_now == 0, result
        rss_resume = _maxrss_mb()
        child = Path(root) / "load.json"
        subprocess.run([sys.executable, __file__, "--url", "-", "--requests", "0", "--out", str(child),
                        "--memory-load", root, "memory"], check=True, timeout=600)
        loaded = json.loads(child.read_text())
        out.write_text(json.dumps({"requests": len(plan.requests), "rss_resume_mb": rss_resume,
                                   "rss_records_mb": loaded["rss_mb"], "rows": loaded["rows"]}))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


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
    ap.add_argument("--memory", type=int, default=0, metavar="N", help="measure memory for N requests instead")
    ap.add_argument("--memory-load", nargs=2, metavar=("ROOT", "RUN_ID"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    if a.impl:
        sys.path.insert(0, str(Path(a.impl).resolve()))
    if a.memory_load:
        from guided_ab.store import RunStore

        df = RunStore(*a.memory_load).records(("ab",))
        Path(a.out).write_text(json.dumps({"rows": len(df), "rss_mb": _maxrss_mb()}))
        return
    if a.memory:
        _memory(a.memory, Path(a.out))
        return

    import guided_ab
    from guided_ab.arms.base import Endpoint
    from guided_ab.config import Workload
    from guided_ab.load.runner import run_plan
    from guided_ab.plan import make_plan
    from guided_ab.store import RunStore
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
    maxrss_mb = _maxrss_mb()

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
