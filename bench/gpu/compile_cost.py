"""Grammar-compile cost per arm, from a finished run's A/B records (needs workload.repeats >= 2).

Each schema is sent twice to every arm; the first request pays the grammar compilation before
its first token, the repeat finds the compiled grammar cached. Per arm: the median over schemas
of TTFT(first) - TTFT(repeat), paired by schema, with a percentile bootstrap 95% interval.
Caveat: vLLM's prefix cache also serves the repeat's prompt, so the difference holds the
prefill saving too; it is the same for every arm, so differences between arms are the backends'.

Usage: python bench/gpu/compile_cost.py runs/<run_id>
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd


def main(run_dir: str) -> None:
    df = pd.read_parquet(Path(run_dir) / "records" / "ab.parquet")
    df = df[~df.warmup & df.ttft_s.notna()]
    rng = np.random.default_rng(0)

    def med_ci(x: np.ndarray) -> str:
        boot = np.median(rng.choice(x, (2000, len(x))), axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return f"{np.median(x) * 1000:.1f} ms [{lo * 1000:.1f}, {hi * 1000:.1f}]"

    print("| arm | schemas paired | TTFT first p50 | TTFT repeat p50 | first - repeat p50 |")
    print("|---|---|---|---|---|")
    for arm, a in df.groupby("arm", sort=False):
        first = a[a.first_for_schema].groupby("schema_id").ttft_s.first()
        rep = a[~a.first_for_schema].groupby("schema_id").ttft_s.first()
        j = pd.concat([first.rename("f"), rep.rename("r")], axis=1).dropna()
        print(f"| {arm} | {len(j)} | {med_ci(j.f.to_numpy())} | {med_ci(j.r.to_numpy())} | {med_ci((j.f - j.r).to_numpy())} |")


if __name__ == "__main__":
    main(sys.argv[1])
