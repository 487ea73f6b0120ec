"""Benchmark: the local vLLM CPU server's flags, side by side on this machine.

Not a test. Starts one server at a time with the embedded model (the local target's command line,
pinned to one core like a local arm) and measures what `configs/local.yaml`'s choices are for:

  dtype     bf16 (what vLLM picks on every x86 CPU) vs float32: time to first token and latency
  KV cache  vLLM's default (most of the RAM) vs the local target's 1 GiB: time until ready
  batching  the float32 server answering one request at a time vs two at once: throughput

Prints a table per part, then one line:
`bf16_over_fp32_ttft=<x> default_kv_over_1g_ready=<x> batch2_throughput_ratio=<x>`.
Takes 6-8 minutes on a 2-core VM.

    .venv/bin/python bench/cpu_server_flags.py [--schemas 6] [--batch-schemas 8] [--core 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_ab.arms.local import REPO_ROOT, free_port, vllm_python  # noqa: E402
from guided_ab.arms.local_model import ensure_embedded_model  # noqa: E402
from guided_ab.arms.vllm_args import SERVED_MODEL_NAME, SERVER_MODULE, server_args, server_env  # noqa: E402
from guided_ab.config import Arm, Workload  # noqa: E402
from guided_ab.load.client import chat_body, new_session, send_chat  # noqa: E402
from guided_ab.workload import builtin_suite  # noqa: E402

BASE_ARGS = ["--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "4"]


class Server:
    """One vLLM server as the local target starts it (its own process group, its key in the env)."""

    def __init__(self, args: list[str], *, kv_gib: str | None, core: str, log: Path):
        self.key = secrets.token_hex(16)
        self.port = free_port()
        arm = Arm(name="bench", role="control", target="local", backend="guidance", model="smollm2-135m",
                  server_args=BASE_ARGS + args)
        python = vllm_python()
        model = str(ensure_embedded_model(python))
        env = {**os.environ, **server_env(arm, self.key), "VLLM_CPU_OMP_THREADS_BIND": core,
               "PYTHONPATH": str(REPO_ROOT)}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if kv_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = kv_gib
        cmd = [python, "-m", SERVER_MODULE, *server_args(arm, model, host="127.0.0.1", port=self.port)]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.url, self.log = f"http://127.0.0.1:{self.port}", log

    def wait_ready(self, deadline_s: float = 900) -> float:
        while time.perf_counter() - self.t0 < deadline_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}: see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready within {deadline_s:.0f} s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


async def send(server: Server, items, *, concurrency: int, max_tokens: int) -> tuple[float, list]:
    """(wall seconds, responses) for items sent with at most `concurrency` in flight."""
    template = Workload().prompt_template
    sem = asyncio.Semaphore(concurrency)
    async with new_session(concurrency) as http:
        async def one(item):
            async with sem:
                body = chat_body(SERVED_MODEL_NAME, item.render(template), item.json_schema, name=item.schema_id,
                                 temperature=0.0, max_tokens=max_tokens, stream=True)
                return await send_chat(http, server.url, body, api_key=server.key, timeout_s=300)
        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in items))
        return time.perf_counter() - t, out


def _med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemas", type=int, default=6, help="suite schemas per dtype/KV variant, one at a time")
    ap.add_argument("--batch-schemas", type=int, default=8, help="schemas for the one-vs-two-at-once part")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--core", default="1", help="CPU id the server computes on (VLLM_CPU_OMP_THREADS_BIND)")
    args = ap.parse_args()
    # schemas both backends accept (guidance rejects uniqueItems): failures would skew the times
    items = [i for i in builtin_suite() if "uniqueItems" not in str(i.json_schema)]
    single, batch = items[: args.schemas], items[args.schemas: args.schemas + args.batch_schemas]
    logs = Path(tempfile.mkdtemp(prefix="guided-ab-cpu-flags-"))
    print(f"machine: {os.cpu_count()} cores; server logs in {logs}", flush=True)

    variants = [
        ("bf16, default KV cache", ["--dtype", "bfloat16"], None),
        ("float32, default KV cache", ["--dtype", "float32"], None),
        ("float32, 1 GiB KV cache (local target)", ["--dtype", "float32"], "1"),
    ]
    rows, res = [], {}
    for name, flags, kv in variants:
        server = Server(flags, kv_gib=kv, core=args.core, log=logs / f"{len(rows)}.log")
        try:
            ready = server.wait_ready()
            asyncio.run(send(server, items[-1:], concurrency=1, max_tokens=8))  # first-request costs out of the way
            wall, out = asyncio.run(send(server, single, concurrency=1, max_tokens=args.max_tokens))
            if name.startswith("float32, 1 GiB"):
                w1, o1 = asyncio.run(send(server, batch, concurrency=1, max_tokens=args.max_tokens))
                w2, o2 = asyncio.run(send(server, batch, concurrency=2, max_tokens=args.max_tokens))
        finally:
            server.stop()
        res[name] = dict(ready=ready, ttft=_med(r.ttft_s for r in out), lat=_med(r.latency_s for r in out), wall=wall)
        rows.append((name, ready, res[name]["ttft"], res[name]["lat"], wall,
                     sum(r.completion_tokens or 0 for r in out)))
        print(f"  {name}: ready {ready:.1f} s, median TTFT {res[name]['ttft']:.2f} s", flush=True)

    print(f"\n{'server':42} {'ready s':>8} {'TTFT p50 s':>11} {'latency p50 s':>14} {'wall s':>7} {'tokens':>7}")
    for name, ready, ttft, lat, wall, tok in rows:
        print(f"{name:42} {ready:8.1f} {ttft:11.2f} {lat:14.2f} {wall:7.1f} {tok:7d}")
    print(f"\n{'float32, 1 GiB KV, ' + str(len(batch)) + ' schemas':42} {'wall s':>8} {'req/s':>7} {'mean latency s':>15}")
    for label, w, o in (("one at a time", w1, o1), ("two at once", w2, o2)):
        print(f"{label:42} {w:8.1f} {len(o) / w:7.3f} {statistics.mean(r.latency_s for r in o):15.2f}")

    bf, fp, fp1 = (res[v[0]] for v in variants)
    print(f"\nbf16_over_fp32_ttft={bf['ttft'] / fp['ttft']:.2f} default_kv_over_1g_ready={fp['ready'] / fp1['ready']:.2f} "
          f"batch2_throughput_ratio={w1 / w2:.2f}")


if __name__ == "__main__":
    main()
