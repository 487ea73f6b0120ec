"""How a report writes numbers and words, once for every output (report.md, report.html, the CLI
tables, the Prefect artifacts): the verdict sentences, number and interval formatting, the arm
palette. The bottom layer of guided_ab.reports: it imports nothing from the package, so every
other report module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

VERDICT_TEXT = {
    "switch": "SWITCH to the candidate",
    "keep": "KEEP the control",
    "inconclusive": "INCONCLUSIVE: run more requests",
    "invalid": "INVALID experiment: fix and re-run",
}

# one colour per arm, in the order control, candidates (plots, HTML cards)
ARM_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c")


def verdict_text(verdict: str) -> str:
    """The sentence for a verdict ("switch" -> "SWITCH to the candidate"); unknown verdicts as they are."""
    return VERDICT_TEXT.get(verdict, verdict)


def num(x: Any, fmt: str = "{:.2f}", none: str = "n/a") -> str:
    """`fmt` applied to x; `none` for a missing or non-finite number (evaluation.json writes None
    where a statistic is undefined)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def interval_parts(d: Mapping[str, Any] | None, fmt: str = "{:.2f}") -> tuple[str, str | None]:
    """An evaluation interval ({"estimate", "ci_low", "ci_high"}) as ("estimate", "[low, high]"),
    the second None when the interval has no bounds; ("n/a", None) without an estimate.
    Each output joins the two its own way (plain text, or the bounds muted in HTML)."""
    if not d or d.get("estimate") is None:
        return "n/a", None
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None:
        return num(d["estimate"], fmt), None
    return fmt.format(d["estimate"]), f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def interval(d: Mapping[str, Any] | None, fmt: str = "{:.2f}") -> str:
    """An evaluation interval as plain text: "0.95 [0.86, 1.05]", "0.95" without bounds, or "n/a"."""
    est, ci = interval_parts(d, fmt)
    return est if ci is None else f"{est} {ci}"


def hypothesis_line(h: Mapping[str, Any]) -> str:
    """A pre-registered hypothesis and its outcome, as the decision states it ("the expectation
    that 'auto' (auto) serves >90% with guidance is false: 13% [5%, 30%] (A/B phase)")."""
    role = "guardrail" if h.get("role") == "guardrail" else "hypothesis"
    return f"Pre-registered {role}: {h.get('text') or h.get('statement', '')}"


def counts_text(counts: Mapping[str, Any], sep: str = " ") -> str:
    """{"xgrammar": 7, "guidance": 113} -> "guidance 113, xgrammar 7" (sorted by name)."""
    return ", ".join(f"{k}{sep}{v}" for k, v in sorted(counts.items()))
