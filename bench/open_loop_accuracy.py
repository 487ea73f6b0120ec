"""How truthfully the open loop keeps its schedule: a Poisson profile through the product's runner.

    .venv/bin/python bench/open_loop_accuracy.py                  # 500 req/s for 30 s, then guidellm
    .venv/bin/python bench/open_loop_accuracy.py --skip-guidellm  # ours only

One loopback server (bench/loopback_server.py, as bench/loadgen_vs_guidellm.py uses) answers
every request; our side is guided_ab.load.runner.run_plan with a `poisson` LoadProfile (the path
an experiment phase with `workload.load.ab.profile: poisson` takes: the dispatcher, the client,
validation, the fsync'd journal), in a process of its own (`--worker`) so its CPU is its own.
From the records (each carries `scheduled_at`, `sent_at` = when the request went out, stamped by
the client's trace hook, and `send_lag_s`):

    achieved_rate    (requests sent - 1) / (last send - first send): arrivals per second of the
                     sends themselves (n sends span n - 1 gaps)
    send_lag_p99_ms  99th percentile of sent_at - scheduled_at
    ks_p             Kolmogorov-Smirnov test (scipy.stats.kstest) of the actual inter-send times
                     against the exponential distribution at the target rate

Beside it, guidellm's Poisson profile at the same rate on the same server (the guidellm venv,
tokenizer and run machinery of bench/loadgen_vs_guidellm.py, imported; it installs
.venv-guidellm when missing): its achieved rate (completed requests over the server-side span,
as there) and its TTFT error against the server's own timing (and ours, for comparison).

The last line is `target_rate=<r> achieved_rate=<a> send_lag_p99_ms=<x> ks_p=<p>`; the goal is
|a/r - 1| <= 0.02, lag p99 <= 2 ms, ks_p >= 0.01 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

PROMPT = ("Benchmark request {i}: describe the weather in one short JSON object. " * 4).strip()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the worker: our open loop, in a process of its own ------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import shutil

    from guided_ab.arms.base import Endpoint
    from guided_ab.config import LoadProfile, Workload
    from guided_ab.load.arrivals import planned_pairs
    from guided_ab.load.runner import run_plan
    from guided_ab.plan import make_plan
    from guided_ab.store import RunStore
    from guided_ab.workload import WorkItem

    load = LoadProfile(profile="poisson", rate=a.rate, max_in_flight=a.max_in_flight, duration_s=a.duration)
    n = planned_pairs(load, a.seed, "ab")
    assert n is not None
    schema = {"type": "object"}  # the loopback server's answers validate against it
    items = [WorkItem(schema_id=f"s{i:06d}", subset="bench", prompt=PROMPT.format(i=i), json_schema=schema)
             for i in range(n)]
    plan = make_plan("ab", ["lb"], items, seed=a.seed, stream_share=a.stream_share)  # one arm: one request per arrival
    wl = Workload(max_tokens=a.tokens, timeout_s=60, stream_share=a.stream_share, temperature=0.0, seed=a.seed)
    endpoints = {"lb": Endpoint(run_id="bench", arm="lb", target="external", base_url=a.url, model="loopback",
                                backend="loopback")}
    root = tempfile.mkdtemp(prefix="guided-ab-open-loop-")
    try:
        store = RunStore(root, f"bench-{os.getpid()}")
        (store.dir / "records").mkdir(parents=True, exist_ok=True)
        from guided_ab.load.send_clock import loop_runner  # as phases.run_requests runs an open-loop phase

        def cpu_s() -> float:  # this process and its send clock (a child, counted once it has ended)
            return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                           resource.getrusage(resource.RUSAGE_CHILDREN)))

        cpu0 = cpu_s()
        t0 = time.perf_counter()
        result = loop_runner(True)(run_plan(plan, endpoints, store, wl, load=load))
        wall = time.perf_counter() - t0
        cpu = cpu_s() - cpu0
        rows = []
        for r in store.journal("ab"):
            rid = None
            try:
                rid = json.loads(r.output or "").get("id")
            except (ValueError, AttributeError):
                pass
            rows.append({"id": rid, "sent_at": r.sent_at, "scheduled_at": r.scheduled_at, "send_lag_s": r.send_lag_s,
                         "ttft_s": r.ttft_s, "latency_s": r.latency_s, "outcome": r.outcome})
        Path(a.out).write_text(json.dumps({"planned": result.planned, "recorded": result.recorded, "wall_s": wall,
                                           "cpu_s": cpu, "requests": rows}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- measuring -----------------------------------------------------------------------------------
def measure(data: dict, rate: float, server: dict[str, dict]) -> dict:
    import numpy as np
    from scipy import stats

    rows = sorted(data["requests"], key=lambda r: r["sent_at"])
    sent = np.array([r["sent_at"] for r in rows])
    lags = np.array([r["send_lag_s"] for r in rows]) * 1000
    gaps = np.diff(sent)
    span = sent[-1] - sent[0]
    ks = stats.kstest(gaps, "expon", args=(0, 1 / rate))
    ttft_err = []
    for r in rows:
        s = server.get(r["id"]) if r["id"] else None
        if s and s["ok"] and r["outcome"] == "success" and r["ttft_s"] is not None:
            ttft_err.append(1000 * (r["ttft_s"] - (s["t_first"] - s["t_recv"])))
    return {
        "n": len(rows), "ok": sum(r["outcome"] == "success" for r in rows), "achieved": (len(rows) - 1) / span,
        "lag_p50": float(np.percentile(lags, 50)), "lag_p99": float(np.percentile(lags, 99)),
        "lag_max": float(lags.max()), "ks_p": float(ks.pvalue), "ks_d": float(ks.statistic),
        "ttft_err_mean": float(np.mean(ttft_err)) if ttft_err else float("nan"),
        "ttft_err_p99": float(np.percentile(ttft_err, 99)) if ttft_err else float("nan"),
        "cores": data["cpu_s"] / data["wall_s"], "cpu_ms_per_req": 1000 * data["cpu_s"] / max(1, len(rows)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="target arrivals per second")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the schedule (pre-registered duration_s)")
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    ap.add_argument("--token-delay-ms", type=float, default=0.0, help="server delay per token")
    ap.add_argument("--stream-share", type=float, default=1.0, help="share of requests sent streaming (TTFT needs it)")
    ap.add_argument("--seed", type=int, default=20251027)
    ap.add_argument("--skip-guidellm", action="store_true")
    ap.add_argument("--realtime", action="store_true",
                    help="run the loopback server and our client under SCHED_FIFO (needs root): on a machine shared "
                         "with other work, so that it does not preempt them; guidellm runs at normal priority")
    ap.add_argument("--guidellm-requests", type=int, default=3000,
                    help="requests in guidellm's run (it does not keep up with the rate; fewer keep the run short)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    import loadgen_vs_guidellm as lg

    t_begin = time.time()
    outdir = lg.WORK / f"open-loop-{time.strftime('%Y%m%d-%H%M%S')}"
    outdir.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    log(f"machine: {machine}; load average {os.getloadavg()[0]:.1f}; output in {outdir}")
    tokenizer = None
    if not a.skip_guidellm:
        lg.ensure_guidellm()
        tokenizer = lg.ensure_tokenizer()
    if a.realtime:  # inherited by the server and our worker started below
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    server = lg.LoopbackServer(outdir / "server.log")
    gl_result = None
    try:
        server.configure(delay_ms=a.token_delay_ms, tokens=a.tokens)
        server.take_timings()
        log(f"ours: Poisson {a.rate:g}/s for {a.duration:g} s, at most {a.max_in_flight} in flight")
        out = outdir / "ours.json"
        load0 = os.getloadavg()[0]
        subprocess.run([sys.executable, __file__, "--worker", "--url", server.url, "--out", str(out),
                        "--rate", str(a.rate), "--duration", str(a.duration), "--max-in-flight", str(a.max_in_flight),
                        "--tokens", str(a.tokens), "--seed", str(a.seed), "--stream-share", str(a.stream_share)], check=True, timeout=max(300, 5 * a.duration))
        timings = server.take_timings()
        data = json.loads(out.read_text())
        ours = measure(data, a.rate, timings)
        if a.realtime:  # guidellm (started from here) at normal priority
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if not a.skip_guidellm:
            sc = lg.Scenario("poisson", f"Poisson {a.rate:g}/s", a.guidellm_requests, rate=a.rate,
                             delay_ms=a.token_delay_ms, tokens=a.tokens)
            log(f"guidellm: Poisson {a.rate:g}/s, {a.guidellm_requests} requests")
            assert tokenizer is not None
            gl_result = lg.run_guidellm(server, [sc], tokenizer, outdir, None, timeout_s=420)[0]
    finally:
        server.stop()

    print(f"\nmachine: {machine}; {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start {load0:.1f}, "
          f"now {os.getloadavg()[0]:.1f}")
    print(f"answers: {a.tokens} tokens x {a.token_delay_ms:g} ms (loopback server)"
          + ("; server and our client under SCHED_FIFO (--realtime), guidellm not" if a.realtime else ""))
    print(f"ours:     {ours['n']} requests ({ours['ok']} ok, {data['recorded']}/{data['planned']} recorded), "
          f"achieved {ours['achieved']:.1f}/s of {a.rate:g}/s; send lag p50 {ours['lag_p50']:.3f} ms, "
          f"p99 {ours['lag_p99']:.3f} ms, max {ours['lag_max']:.1f} ms; KS D={ours['ks_d']:.4f} p={ours['ks_p']:.3f}; "
          f"TTFT error mean {ours['ttft_err_mean']:.2f} ms, p99 {ours['ttft_err_p99']:.2f} ms; "
          f"client {ours['cores']:.2f} cores, {ours['cpu_ms_per_req']:.2f} CPU ms/request")
    if gl_result is not None:
        tm, _, t99 = lg.stats(gl_result.ttft_err)
        note = f" ! {gl_result.note}" if gl_result.note else ""
        print(f"guidellm {lg.GUIDELLM_VERSION}: {gl_result.ok}/{gl_result.planned} ok, achieved {gl_result.rate:.1f}/s "
              f"of {a.rate:g}/s (completed over the server-side span); TTFT error mean {tm:.2f} ms, p99 {t99:.2f} ms; "
              f"client {gl_result.cores:.2f} cores{note}")
    print(f"total wall time {time.time() - t_begin:.0f} s; raw data in {outdir}")
    print(f"target_rate={a.rate:g} achieved_rate={ours['achieved']:.1f} send_lag_p99_ms={ours['lag_p99']:.3f} "
          f"ks_p={ours['ks_p']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
