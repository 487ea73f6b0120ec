"""Benchmark: evaluate 100k request records (2 arms x 50k pairs) with >= 2,000 bootstrap resamples,
in memory, then the same run read from its run store on disk and on S3, side by side.

Not a test. Prints the timings; the last line is `wall_s=<seconds of evaluate() from disk>`.
Target: < 10 s on 2 cores (from disk: reading the finalized parquet and evaluating).

The S3 store is moto's S3 server on loopback (tests/s3_server.py), the same records written as the
A/B phase writes them there: journal parts of GUIDED_AB_PART_RECORDS records (default 500) and,
once the phase ends, the finalized parquet. `--journal` also times reading the run from the parts
alone (a phase killed before it finalized), merged and de-duplicated by request id.

    python bench/evaluate_100k.py [--records 100000] [--resamples 2000] [--stores disk,s3] [--journal]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import orjson  # noqa: E402

from guided_ab.analysis.decision import decide  # noqa: E402
from guided_ab.analysis.evaluation import evaluate  # noqa: E402
from guided_ab.analysis.simulate import planned_counts, synthetic_config, synthetic_records  # noqa: E402


def write_run(store_root: str, cfg, df, part_records: int) -> object:
    """The run as the A/B phase leaves it: the journal (a file, or parts), then the finalized parquet."""
    from guided_ab.store import RunStore

    cfg = cfg.model_copy(update={"store": store_root})
    store = RunStore.create(cfg, "bench-100k")
    rows = [orjson.dumps({k: v for k, v in r.items() if v is not None and v == v}) for r in df.to_dict("records")]
    if store.location == str(store.dir):  # disk: the append-only journal
        store.journal_path("ab").parent.mkdir(parents=True, exist_ok=True)
        store.journal_path("ab").write_bytes(b"\n".join(rows) + b"\n")
    else:  # object store: parts of `part_records`, as a writer flushes them
        from guided_ab.storage_object import _PartWriter

        writer = _PartWriter(store, "ab")  # type: ignore[arg-type]
        for i in range(0, len(rows), part_records):
            chunk = rows[i:i + part_records]
            writer.write([orjson.loads(r)["request_id"] for r in chunk], chunk)
    store.finalize_records("ab")
    return store


def timed_evaluate(label: str, store, cfg, seed: int, journal: bool) -> float:
    t0 = time.perf_counter()
    df = store.records(("ab",))
    t1 = time.perf_counter()
    evaluate(df, cfg, planned=planned_counts(df), seed=seed)
    t2 = time.perf_counter()
    print(f"{label}: records={len(df)} read_s={t1 - t0:.2f} evaluate_s={t2 - t1:.2f} wall_s={t2 - t0:.2f}", flush=True)
    if journal:
        t3 = time.perf_counter()
        n = len(store._journal_frame("ab"))
        print(f"{label}: journal only (no parquet): records={n} read_s={time.perf_counter() - t3:.2f}", flush=True)
    return t2 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000, help="total records (two arms, paired)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stores", default="disk,s3", help="run stores to read the same run from: disk, s3 (moto), or none")
    ap.add_argument("--journal", action="store_true", help="also time reading the journal alone (no parquet)")
    args = ap.parse_args()
    pairs = args.records // 2

    t0 = time.perf_counter()
    df = synthetic_records(pairs, p_control=0.93, p_candidate=0.92, ratio=0.9, warmup=0, seed=args.seed)
    cfg = synthetic_config(resamples=args.resamples)
    t1 = time.perf_counter()
    ev = evaluate(df, cfg, planned=planned_counts(df), seed=args.seed)
    t2 = time.perf_counter()
    dec = decide(ev, cfg.decision)
    t3 = time.perf_counter()
    json.dumps(ev, allow_nan=False)
    comp = ev["comparisons"]["candidate"]["latency"]
    print(f"records={len(df)} pairs={pairs} resamples={args.resamples}")
    print(f"generate_s={t1 - t0:.2f} decide_s={t3 - t2:.3f} verdict={dec['verdict']}")
    print(f"p50_ratio={comp['ratio_p50']['estimate']:.4f} [{comp['ratio_p50']['ci_low']:.4f}, {comp['ratio_p50']['ci_high']:.4f}]")
    print(f"in memory: evaluate_s={t2 - t1:.2f}", flush=True)

    stores = [s for s in args.stores.split(",") if s in ("disk", "s3")]
    part_records = int(os.environ.get("GUIDED_AB_PART_RECORDS", 500))
    disk_wall = t2 - t1
    with tempfile.TemporaryDirectory(prefix="bench-100k-") as tmp:
        os.environ.setdefault("GUIDED_AB_STATE_DIR", str(Path(tmp) / "state"))
        if "disk" in stores:
            t = time.perf_counter()
            store = write_run(str(Path(tmp) / "runs"), cfg, df, part_records)
            print(f"disk: write_s={time.perf_counter() - t:.2f} (journal file + parquet)", flush=True)
            disk_wall = timed_evaluate("disk", store, cfg, args.seed, args.journal)
        if "s3" in stores:
            from s3_server import start_server

            server = start_server()
            try:
                os.environ.update(server.env())
                bucket = server.new_bucket("bench")
                t = time.perf_counter()
                store = write_run(f"s3://{bucket}/runs", cfg, df, part_records)
                print(f"s3: write_s={time.perf_counter() - t:.2f} ({-(-len(df) // part_records)} journal parts of "
                      f"{part_records} + parquet, moto on loopback)", flush=True)
                timed_evaluate("s3", store, cfg, args.seed, args.journal)
            finally:
                server.proc.terminate()
                server.proc.wait(10)
    print(f"wall_s={disk_wall:.2f}")


if __name__ == "__main__":
    main()
