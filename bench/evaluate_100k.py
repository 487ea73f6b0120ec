"""Benchmark: evaluate 100k request records (2 arms x 50k pairs) with >= 2,000 bootstrap resamples.

Not a test. Prints the timings; the last line is `wall_s=<seconds of evaluate()>`.
Target: < 10 s on 2 cores.

    python bench/evaluate_100k.py [--records 100000] [--resamples 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_ab.analysis.decision import decide  # noqa: E402
from guided_ab.analysis.evaluation import evaluate  # noqa: E402
from guided_ab.analysis.simulate import planned_counts, synthetic_config, synthetic_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000, help="total records (two arms, paired)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
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
    print(f"wall_s={t2 - t1:.2f}")


if __name__ == "__main__":
    main()
