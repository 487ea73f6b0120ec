"""Why one arm's latency differs from the other's: it computes slower, or it lets the model write more.

Why this exists: latency = time to first token + (output tokens - 1) x time per output token. A
backend whose grammar lets the model ramble (or run into max_tokens) is slower end to end with
exactly the same per-token speed, and the remedy is different (max_tokens, the prompt, the
schema) from that of a grammar that computes slower. A latency guardrail "not met" must say which,
so that "slower" never reads as "the grammar is slower" when the answers were just longer.

The cause is read off the paired intervals the evaluation computed (comparison.explain_section):
- computes slower/faster: the time-per-output-token or TTFT p50 ratio interval excludes 1;
- writes more/less: the output-tokens mean ratio interval excludes 1, or the difference in the
  share of answers cut at max_tokens excludes 0.
Descriptive: these intervals are at the nominal level and never change a verdict.
"""

from __future__ import annotations

from typing import Any


def _ratio(iv: dict | None) -> str:
    if not iv or iv.get("estimate") is None:
        return "n/a"
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"x{iv['estimate']:.2f}{ci}"


def _side(iv: dict | None, ref: float) -> int:
    """+1 when the interval lies above `ref`, -1 below, 0 otherwise (or without an interval)."""
    if not iv or iv.get("ci_low") is None or iv.get("ci_high") is None:
        return 0
    return 1 if iv["ci_low"] > ref else (-1 if iv["ci_high"] < ref else 0)


def latency_cause(comp: dict, direction: int) -> dict[str, Any]:
    """{"cause", "text", "direction"}: why the candidate is slower (direction +1) or faster (-1).

    cause: "longer outputs" / "shorter outputs", "slower computation" / "faster computation",
    "both", or "unexplained" (neither shows at this n)."""
    ex = comp.get("explain") or {}
    tpot, ttft, toks = ex.get("tpot_p50_ratio"), ex.get("ttft_p50_ratio"), ex.get("tokens_mean_ratio")
    trunc = ex.get("truncation") or {}
    compute = direction if direction in (_side(tpot, 1.0), _side(ttft, 1.0)) else 0
    writes = direction if direction in (_side(toks, 1.0), _side(trunc.get("diff"), 0.0)) else 0
    more, slower = ("more", "slower") if direction > 0 else ("less", "faster")
    tokens_txt = f"output tokens {_ratio(toks)}"
    ks, cs = trunc.get("control_share"), trunc.get("candidate_share")
    if ks is not None and cs is not None and (trunc.get("control_count") or trunc.get("candidate_count")):
        tokens_txt += f", answers cut at max_tokens {cs:.0%} vs {ks:.0%}"
    compute_txt = f"time per output token {_ratio(tpot)}, time to first token {_ratio(ttft)}"
    if writes and not compute:
        cause = f"{'longer' if direction > 0 else 'shorter'} outputs"
        text = (f"{slower} because it lets the model write {more} ({tokens_txt}), not because the grammar "
                f"computes {slower} ({compute_txt})")
    elif compute and not writes:
        cause = f"{slower} computation"
        text = f"{slower} because it computes {slower} ({compute_txt}); the answers are as long ({tokens_txt})"
    elif compute and writes:
        cause = "both"
        text = f"{slower} both because it computes {slower} ({compute_txt}) and because the model writes {more} ({tokens_txt})"
    else:
        cause = "unexplained"
        text = f"neither per-token speed nor answer length explains it at this n ({compute_txt}; {tokens_txt})"
    return {"cause": cause, "text": text, "direction": direction}
