"""The numbers and tables of `guided-ab simulate`, from its per-experiment results.

Separate from `simulate.py` (which runs the experiments) because this is where the headline
numbers are *defined*: how coverage cells are pooled, what counts as a wrong decision, how the
fixed-size design's pairs at equal power are computed. `simulate.py`'s docstring states the
definitions in words; the functions here are those words in code. Tables are rich `Table`s,
returned, never printed.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from rich.table import Table

from guided_ab.analysis import stats as S
from guided_ab.analysis import truth as T

WRONG = {"keep": {"switch", "invalid"}, "switch": {"keep", "invalid"}, "either": {"invalid"}}
FIXED = ("fixed_small", "fixed_mid", "fixed_cap")
DESIGNS = (*FIXED, "sequential")
POWER_CLAMP = (0.05, 0.99)


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def _se(p: float | None, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / n) if p is not None and n else None


def _decisions(verdicts: list[str], truth: str) -> dict[str, Any]:
    n = len(verdicts)
    wrong = sum(v in WRONG[truth] for v in verdicts)
    return {"n": n, "wrong": _rate(wrong, n), "inconclusive": _rate(verdicts.count("inconclusive"), n),
            "right": _rate(sum(v == truth for v in verdicts), n) if truth != "either" else None,
            "counts": {v: verdicts.count(v) for v in sorted(set(verdicts))}}


def _scenario_row(name: str, st: Any, rs: list[dict]) -> dict[str, Any]:
    truth = st.verdict
    row: dict[str, Any] = {"scenario": name, "about": st.scn.about, "truth_verdict": truth, "truth_route": st.route[1],
                           "true_effect": st.differs, "repeats": st.scn.repeats, "schemas": st.scn.schemas, "experiments": len(rs),
                           "seq_cap": st.seq_cap, "seq_look": st.seq_look, "seq_planned": st.seq_planned,
                           "truth": st.cap.values, "truth_mc_se": st.cap.mc_se, "designs": {}}
    for d in FIXED:
        row["designs"][d] = _decisions([e["verdict"] for r in rs for e in r["fixed"][d]], truth)
        row["designs"][d]["size"] = rs[0]["fixed"][d][0]["size"] if rs else None
    for d in ("sequential", "naive"):
        row["designs"][d] = _decisions([r[d]["verdict"] for r in rs], truth)
        row["designs"][d]["mean_pairs"] = float(np.mean([r[d]["pairs"] for r in rs])) if rs else None
    rates = [row["designs"][d]["wrong"] for d in DESIGNS if row["designs"][d]["wrong"] is not None]
    row["wrong"] = float(np.mean(rates)) if rates else None
    row["worst_design_wrong"] = max(rates) if rates else None
    row["sequences_held"] = {k: _rate(sum(r["sequential"]["held"][k] for r in rs), len(rs))
                             for k in (rs[0]["sequential"]["held"] if rs else {})}
    cells = _coverage(rs)
    row["coverage"] = {stat: _pool_cells(by_size) for stat, by_size in cells.items()}
    row["coverage_cells"] = cells
    return row


def _pool_cells(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    n = sum(c["n"] for c in cells.values())
    return {"n": n, "rate": _rate(sum(c["covered"] for c in cells.values()), n)}


def _coverage(results: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """{statistic: {size label: {n, covered, rate, se, missing}}} over every fixed-size run."""
    cells: dict[tuple[str, str], list[bool | None]] = {}
    for r in results:
        for d in FIXED:
            for e in r["fixed"][d]:
                for stat, c in e["covers"].items():
                    cells.setdefault((stat, e["size"]), []).append(c)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (stat, size), cs in sorted(cells.items()):
        known = [c for c in cs if c is not None]
        p = _rate(sum(known), len(known))
        out.setdefault(stat, {})[size] = {"n": len(known), "covered": sum(known), "rate": p, "se": _se(p, len(known)),
                                         "missing": len(cs) - len(known)}
    return out


def pairs_for(values: dict[str, float], route: tuple[str, str], sds: dict[str, float | None], rule: Any, seq: Any,
              power: float, alpha: float, latency_key: str = "latency_p50_ratio") -> tuple[int | None, str | None]:
    """Schemas a fixed-size run needs for `power` on the criterion that binds on the way to the
    right decision (simulate's docstring), and that criterion; (None, None) when no fixed size
    gets there (a truth on a bound). `sds`: per-schema sds of the success difference, the latency
    log-ratio and the log CV ratio (a criterion without its sd is not part of the rule: the
    sequential rule has no CV one); `latency_key`: the latency truth the rule judges."""
    def need(effect: float, sd: float | None) -> int | None:
        return S.n_needed(effect, sd, alpha, power) if effect > 1e-9 else None

    p50, cvr, succ = values[latency_key], values["cv_ratio"], values["success_diff"]
    lat_bound, cv_bound = math.log(1 + rule.latency_margin), math.log(rule.max_cv_ratio)
    has = {k: bool(v) for k, v in sds.items()}
    crit: dict[str, int | None]
    if route[1] == "gain":  # every guardrail met and the easier gain shown
        crit = {"success non-inferiority": need(succ + rule.success_margin, sds["success"]),
                "latency non-inferiority": need(lat_bound - math.log(p50), sds["latency"])}
        if has.get("cv"):
            crit["CV ratio"] = need(cv_bound - math.log(cvr), sds.get("cv"))
        gains = {g: n for g, n in (("faster", need(-math.log(p50), sds["latency"])),
                                   ("more successful", need(succ, sds["success"]))) if n is not None}
        if not gains:
            return None, None
        g = min(gains, key=lambda k: gains[k])
        crit[f"gain ({g})"] = gains[g]
        if any(v is None for v in crit.values()):
            return None, None
        binding = max(crit, key=lambda k: crit[k] or 0)
    elif route[1] == "guardrail":  # one broken guardrail shown suffices: the easiest
        crit = {"success below its margin": need(-rule.success_margin - succ, sds["success"]),
                "latency above its margin": need(math.log(p50) - lat_bound, sds["latency"])}
        if has.get("cv"):
            crit["CV ratio above its maximum"] = need(math.log(cvr) - cv_bound, sds.get("cv"))
        crit = {k: v for k, v in crit.items() if v is not None}
        if not crit:
            return None, None
        binding = min(crit, key=lambda k: crit[k] or 0)
    elif route[1] == "futility":  # no worthwhile gain on either primary
        lat_gain, succ_gain = T.min_gains(rule, seq)
        crit = {"latency futility": need(math.log(p50) - math.log(1 - lat_gain), sds["latency"]),
                "success futility": need(succ_gain - succ, sds["success"])}
        if any(v is None for v in crit.values()):
            return None, None
        binding = max(crit, key=lambda k: crit[k] or 0)
    else:
        return None, None
    return crit[binding], binding


def _fixed_pairs(row: dict, rs: list[dict], rule: Any, seq: Any, power: float) -> tuple[int | None, str | None]:
    """Pairs a fixed-size run needs for `power` (pairs_for), with the per-schema sds the
    evaluation reports (averaged over the cap-size runs): schemas needed x the scenario's repeats.
    None where the schemas needed exceed a repeating scenario's pool (no fixed size gets there)."""
    sds: dict[str, float | None] = {}
    for key in ("success", "latency", "cv"):
        vals = [e["sd"][key] for r in rs for e in r["fixed"]["fixed_cap"] if e["sd"].get(key) is not None]
        sds[key] = float(np.mean(vals)) if vals else None
    n, binding = pairs_for(row["truth"], (row["truth_verdict"], row["truth_route"]), sds, rule, seq, power, float(rule.alpha))
    if n is None or (int(row["repeats"]) > 1 and n > int(row["schemas"])):
        return None, binding
    return n * int(row["repeats"]), binding


def _pairs_saved(rows: list[dict], by: dict[str, list[dict]], rule: Any, seq_rule: Any) -> dict[str, Any]:
    per = []
    for row in rows:
        seq = row["designs"]["sequential"]
        if row["truth_verdict"] == "either" or not row["true_effect"] or not seq["n"]:
            continue
        power = min(max(seq["right"] or 0.0, POWER_CLAMP[0]), POWER_CLAMP[1])
        n_fixed, binding = _fixed_pairs(row, by[row["scenario"]], rule, seq_rule, power)
        per.append({"scenario": row["scenario"], "route": f"{row['truth_verdict']} ({row['truth_route']})",
                    "cap": row["seq_cap"], "look": row["seq_look"], "planned": row["seq_planned"],
                    "sequential_power": seq["right"], "power_used": power,
                    "sequential_mean_pairs": seq["mean_pairs"], "fixed_pairs": n_fixed, "binding": binding,
                    "saved": None if not n_fixed else 1 - seq["mean_pairs"] / n_fixed,
                    "fixed_power": {row["designs"][d]["size"]: row["designs"][d]["right"] for d in FIXED}})
    for p in per:  # the designs that reached the power their cap was planned for (docstring)
        p["counted"] = bool(p["fixed_pairs"]) and (p["sequential_power"] or 0.0) >= float(rule.power)
    ok = [p for p in per if p["counted"]]
    total = 1 - sum(p["sequential_mean_pairs"] for p in ok) / sum(p["fixed_pairs"] for p in ok) if ok else None
    return {"scenarios": per, "pairs_saved": total}


def summarize(results: list[dict], truths: dict[str, Any], settings: Any, rule: Any, seq: Any) -> dict[str, Any]:
    """The report's numbers: per scenario, coverage cells, pairs saved, and the headline."""
    by: dict[str, list[dict]] = {name: [] for name in truths}
    for r in results:
        by[r["scenario"]].append(r)
    rows = [_scenario_row(name, truths[name], by[name]) for name in truths]
    cov = _coverage(results)
    rates = [c["rate"] for cells in cov.values() for c in cells.values() if c["rate"] is not None]
    saved = _pairs_saved(rows, by, rule, seq)
    wrong = [r["wrong"] for r in rows if r["wrong"] is not None]
    held = {k: _rate(sum(r["sequential"]["held"][k] for r in results), len(results))
            for k in (results[0]["sequential"]["held"] if results else {})}
    naive = {r["scenario"]: r["designs"]["naive"]["wrong"] for r in rows}
    legacy = {}
    for stat in ("success_diff", "latency_p50_ratio", "latency_mean_ratio", "latency_p95_ratio"):
        cells = cov.get(stat, {}).values()
        n = sum(c["n"] for c in cells)
        legacy[stat] = _rate(sum(c["covered"] for c in cells), n)
    return {
        "experiments": len(results), "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "scenarios": rows, "coverage_cells": cov, "pairs": saved,
        "coverage_by_interval": legacy,
        "naive_wrong": naive,
        "sequences_held": held,
        "coverage": min(rates) if rates else float("nan"),
        "wrong_decisions": max(wrong) if wrong else float("nan"),
        "pairs_saved": saved["pairs_saved"] if saved["pairs_saved"] is not None else float("nan"),
    }


# -- tables ----------------------------------------------------------------------------------------
def _f(x: float | None, d: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def truth_table(res: dict) -> Table:
    t = Table(title="Scenarios: the truth (Monte Carlo, at the cap's layout)")
    for c in ("scenario", "truth", "success diff", "p50 ratio", "mean ratio", "CV ratio", "tokens ratio",
              "TPOT ratio", "seq. latency ratio", "what"):
        t.add_column(c)
    for r in res["scenarios"]:
        v = r["truth"]
        t.add_row(r["scenario"], r["truth_verdict"], f"{v['success_diff']:+.3f}", _f(v["latency_p50_ratio"]),
                  _f(v["latency_mean_ratio"]), _f(v["cv_ratio"]), _f(v["tokens_mean_ratio"]), _f(v["tpot_p50_ratio"]),
                  _f(v["seq_latency_ratio"]), r["about"])
    return t


def decision_table(res: dict) -> Table:
    t = Table(title="Decisions per scenario: wrong / inconclusive (sequential: + mean pairs); "
                    "RCI: share of runs whose repeated confidence interval held the truth at every look")
    for c in ("scenario", "truth", "n", "fixed small", "fixed mid", "fixed cap", "sequential", "naive peeking",
              "wrong (mean of 4)", "RCI success", "RCI latency"):
        t.add_column(c)
    for r in res["scenarios"]:
        d = r["designs"]

        def wi(x: dict) -> str:
            return f"{_f(x['wrong'], 2)} / {_f(x['inconclusive'], 2)} (n={x['n']}, {x.get('size') or ''})".replace(", )", ")")
        seq, nv = d["sequential"], d["naive"]
        t.add_row(r["scenario"], r["truth_verdict"], str(r["experiments"]), wi(d["fixed_small"]), wi(d["fixed_mid"]),
                  wi(d["fixed_cap"]), f"{_f(seq['wrong'], 2)} / {_f(seq['inconclusive'], 2)} / {_f(seq['mean_pairs'], 0)}",
                  f"{_f(nv['wrong'], 2)} / {_f(nv['mean_pairs'], 0)}", _f(r["wrong"]),
                  _f(r["sequences_held"].get("seq_success_diff")), _f(r["sequences_held"].get("seq_latency_ratio")))
    return t


def _size_key(size: str) -> tuple[bool, int]:
    m = re.match(r"\d+", size)
    return (not size.isdigit(), int(m.group()) if m else 0)


def coverage_table(res: dict) -> Table:
    cov = res["coverage_cells"]
    sizes = sorted({s for cells in cov.values() for s in cells}, key=_size_key)
    t = Table(title="Coverage of the fixed-size 95% intervals, pooled over scenarios: rate ±SE (n intervals)")
    t.add_column("statistic")
    for s in sizes:
        t.add_column(f"{s} pairs" if s.isdigit() else f"{s} (schemas x repeats)" if "x" in s else s)
    for stat, cells in cov.items():
        t.add_row(stat, *[(f"{_f(c['rate'])} ±{_f(c['se'])} ({c['n']})" + (f" [{c['missing']} none]" if c["missing"] else ""))
                          if (c := cells.get(s)) else "–" for s in sizes])
    return t


def pairs_table(res: dict) -> Table:
    t = Table(title="Pairs: the sequential rule vs a fixed-size run at the same power (scenarios with a true effect)")
    for c in ("scenario", "right decision", "sequential cap / look", "sequential power", "sequential mean pairs",
              "fixed pairs at that power", "binding criterion",
              "saved", "fixed-size power (simulated)"):
        t.add_column(c)
    for p in res["pairs"]["scenarios"]:
        fp = ", ".join(f"{k}: {_f(v, 2)}" for k, v in p["fixed_power"].items())
        t.add_row(p["scenario"], p["route"], f"{p['cap']} / {p['look']}", _f(p["sequential_power"], 2), _f(p["sequential_mean_pairs"], 1),
                  str(p["fixed_pairs"] or "–"), p["binding"] or "–",
                  _f(p["saved"]) + ("" if p["counted"] else " (not counted)"), fp)
    return t


def scenario_coverage_table(res: dict) -> Table:
    stats = sorted({k for r in res["scenarios"] for k in r.get("coverage", {})})
    t = Table(title="Coverage of the fixed-size 95% intervals per scenario, pooled over its sizes: rate (n)")
    t.add_column("scenario")
    for k in stats:
        t.add_column(k.replace("_ratio", "").replace("_", " "))
    for r in res["scenarios"]:
        cov = r.get("coverage", {})
        t.add_row(r["scenario"], *[f"{_f(cov[k]['rate'])} ({cov[k]['n']})" if k in cov else "–" for k in stats])
    return t


def tables(res: dict) -> list[Table]:
    return [truth_table(res), decision_table(res), scenario_coverage_table(res), coverage_table(res), pairs_table(res)]


def sequences_line(res: dict) -> str:
    """The repeated confidence intervals' coverage, apart from the fixed-size one: the share of
    sequential runs (all scenarios) whose interval held the truth at every look up to the cap."""
    n = res["experiments"]
    return "sequences_held_at_every_look=" + " ".join(
        f"{k.removeprefix('seq_')}:{_f(v)}" for k, v in res.get("sequences_held", {}).items()) + f" (n={n}, nominal >= 0.955)"


def naive_line(res: dict) -> str:
    worst = sorted(res["naive_wrong"].items(), key=lambda kv: -(kv[1] or 0))
    return "naive_peeking_wrong_decisions=" + _f(worst[0][1] if worst else None) + " (" + ", ".join(
        f"{k}={_f(v)}" for k, v in worst) + ")"


def final_line(res: dict) -> str:
    return (f"coverage={res['coverage']:.3f} wrong_decisions={res['wrong_decisions']:.3f} "
            f"pairs_saved={res['pairs_saved']:.3f}")
