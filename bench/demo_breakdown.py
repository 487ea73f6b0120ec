"""Where the local demo's wall time goes, phase by phase.

    .venv/bin/python bench/demo_breakdown.py                      # install check, model, then `guided-ab run configs/local.yaml`
    .venv/bin/python bench/demo_breakdown.py --config my.yaml
    .venv/bin/python bench/demo_breakdown.py --analyze runs/<run_id>   # only read a finished run's store

It times what it runs itself (scripts/install.sh, which returns at once when the virtualenvs are
current; the embedded model's conversion, skipped when cached; the `guided-ab run` process) and
reads the rest from the run store (guided_ab/store.py's layout):

    server start   endpoints.json started_at (first arm)  -> deploy.json at (every arm ready)
    observe, A/B   records/<phase>.jsonl: first sent_at    -> last sent_at + latency_s
    teardown       last request's end                      -> teardown.json: last arm's stopped_at
    evaluate       last arm stopped                        -> evaluation.json written
    decide/report  evaluation.json written                 -> decision.json decided_at

Gaps between these (Prefect flow and task start-up, plans, parquet) are shown as their own rows.
The line `teardown_after_last_request_s=<x>` says how long endpoints kept running after the
last request ended (the issue asks for <= 10 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEARDOWN_LIMIT_S = 10.0


@dataclass
class Span:
    name: str
    start: float | None
    end: float | None
    note: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _request_window(run_dir: Path, phase: str) -> tuple[float | None, float | None, int]:
    """(first send, last end, records) of a phase, from its journal (torn lines skipped)."""
    p = run_dir / "records" / f"{phase}.jsonl"
    first = last = None
    n = 0
    if not p.is_file():
        return None, None, 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
            sent = float(r["sent_at"])
        except (ValueError, KeyError, TypeError):
            continue
        n += 1
        end = sent + float(r.get("latency_s") or 0.0)
        first = sent if first is None else min(first, sent)
        last = end if last is None else max(last, end)
    return first, last, n


def store_spans(run_dir: Path) -> tuple[list[Span], float | None]:
    """Phase spans read from a run's store, in time order, and the teardown delay (s)."""
    spans: list[Span] = []
    endpoints = _json(run_dir / "endpoints.json") or {}
    started = [e.get("started_at") for e in endpoints.values() if e.get("started_at")]
    deploy = _json(run_dir / "deploy.json") or {}
    ready = deploy.get("ready_after_s") or {}
    targets = sorted({e.get("target", "?") for e in endpoints.values()})
    note = ", ".join(f"{arm} ready after {s:.0f} s" for arm, s in ready.items()) + (f" ({'/'.join(targets)})" if targets else "")
    spans.append(Span("server start", min(started) if started else None, deploy.get("at"), note))

    last_end = None
    for phase, label in (("observe", "observe"), ("ab", "A/B")):
        first, last, n = _request_window(run_dir, phase)
        if n:
            spans.append(Span(label, first, last, f"{n} records"))
            last_end = last if last_end is None else max(last_end, last)

    teardown = _json(run_dir / "teardown.json") or {}
    stops = [a.get("stopped_at") for a in teardown.get("arms", []) if a.get("stopped_at")]
    stopped_at = max(stops) if stops else teardown.get("at")
    delay = (stopped_at - last_end) if (stopped_at and last_end) else None
    n_stopped = sum(1 for a in teardown.get("arms", []) if a.get("stopped"))
    # the first stop times (a repeated teardown keeps them; its own `at` is the latest call)
    spans.append(Span("teardown", last_end, stopped_at,
                      f"{n_stopped}/{len(teardown.get('arms', []))} arms stopped by the run" if teardown else "no teardown.json"))

    evaluated = _mtime(run_dir / "evaluation.json")
    spans.append(Span("evaluate", stopped_at, evaluated))
    decision = _json(run_dir / "decision.json") or {}
    spans.append(Span("decide + report", evaluated, decision.get("decided_at") or _mtime(run_dir / "report.md"),
                      f"verdict: {decision.get('verdict')}" if decision else ""))
    return spans, delay


def with_gaps(spans: list[Span], start: float | None, end: float | None) -> list[Span]:
    """Spans in time order with the time between them as rows of their own."""
    out: list[Span] = []
    cursor = start
    for s in spans:
        if cursor is not None and s.start is not None and s.start - cursor > 0.05:
            out.append(Span("  (between phases: Prefect, plans, files)" if out else "  (start-up: CLI, Prefect, plans)",
                            cursor, s.start))
        out.append(s)
        if s.end is not None:
            cursor = s.end if cursor is None else max(cursor, s.end)
    if cursor is not None and end is not None and end - cursor > 0.05:
        out.append(Span("  (exit: flow end, process exit)", cursor, end))
    return out


def print_table(rows: list[Span], total: float | None) -> None:
    print(f"\n{'phase':44} {'wall s':>8}  note")
    for r in rows:
        s = r.seconds
        print(f"{r.name:44} {(f'{s:8.1f}') if s is not None else '       -'}  {r.note}")
    if total is not None:
        print(f"{'total':44} {total:8.1f}")


def run_install() -> Span:
    t0 = time.time()
    proc = subprocess.run(["bash", "scripts/install.sh"], cwd=REPO, capture_output=True, text=True, timeout=3600)
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"scripts/install.sh failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    did = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("[install]", "[vllm] [install]"))]
    return Span("install", t0, t1, "installed: " + "; ".join(did)[:120] if did else "skipped (virtualenvs current)")


def run_model() -> Span:
    sys.path.insert(0, str(REPO))
    from guided_ab.arms.local import vllm_python
    from guided_ab.arms.local_model import cache_dir, ensure_embedded_model, is_ready

    cached = is_ready(cache_dir())
    t0 = time.time()
    path = ensure_embedded_model(vllm_python(), log=lambda m: print(f"  {m}", flush=True))
    return Span("model", t0, time.time(), f"{'cached' if cached else 'converted'}: {path}")


def run_demo(config: Path, run_id: str, timeout_s: float) -> tuple[Span, Path]:
    sys.path.insert(0, str(REPO))
    from guided_ab.config import load_config

    cfg = load_config(config)
    run_dir = (REPO / cfg.store / run_id) if not Path(cfg.store).is_absolute() else Path(cfg.store) / run_id
    cli = REPO / ".venv" / "bin" / "guided-ab"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "guided_ab.cli"]
    cmd += ["run", str(config), "--run-id", run_id]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = t0 + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when the process closes its output
        print(f"  | {line.rstrip()}", flush=True)
        if time.time() > deadline:
            proc.kill()
            break
    try:
        proc.wait(max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    t1 = time.time()
    return Span("guided-ab run (whole process)", t0, t1, f"exit {proc.returncode}"), run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    ap.add_argument("--run-id", default=None, help="run id for the demo (default: demo-<time>)")
    ap.add_argument("--analyze", type=Path, metavar="RUN_DIR", help="only read this finished run's store")
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up on the run after this many seconds")
    a = ap.parse_args(argv)

    pre: list[Span] = []
    if a.analyze:
        run_dir, proc_span = a.analyze.resolve(), None
    else:
        if not a.skip_install:
            pre.append(run_install())
        pre.append(run_model())
        run_id = a.run_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        proc_span, run_dir = run_demo(a.config, run_id, a.timeout)

    if not (run_dir / "config.yaml").is_file():
        print(f"no run store at {run_dir}", file=sys.stderr)
        return 1
    spans, delay = store_spans(run_dir)
    rows = pre + with_gaps(spans, proc_span.start if proc_span else None, proc_span.end if proc_span else None)
    total = None
    if pre or proc_span:
        firsts = [s.start for s in pre + ([proc_span] if proc_span else []) if s.start is not None]
        lasts = [s.end for s in pre + ([proc_span] if proc_span else []) if s.end is not None]
        total = max(lasts) - min(firsts) if firsts and lasts else None
    print(f"\nrun store: {run_dir}")
    print_table(rows, total)
    if delay is None:
        print("\nteardown_after_last_request_s=unknown (no requests or no teardown.json)")
        return 1
    verdict = "ok" if delay <= TEARDOWN_LIMIT_S else f"over the {TEARDOWN_LIMIT_S:g} s limit"
    print(f"\nteardown_after_last_request_s={delay:.1f} ({verdict})")
    return 0 if proc_span is None or (proc_span.note == "exit 0") else 1


if __name__ == "__main__":
    sys.exit(main())
