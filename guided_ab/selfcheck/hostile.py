"""The hostile afternoon's scenarios (issue 17): servers that echo the key, answer with a
backtracking-regex bait, 429/999/502 statuses, redirects to another port, a 200 KB header, a
10 MB answer, invalid UTF-8, streams without `[DONE]`, in CRLF, byte by byte or in 5,000 events,
absurd token counts, markup in a header; two writers of one phase; a phase process interrupted
with SIGINT; a reused pid in an old run's endpoints.json. Each is a real attempt through the
pipeline (harness.run_phase and its checks) with the outcome class of every request checked.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.selfcheck.harness import (
    Sandbox,
    account,
    all_success,
    check_run,
    expect,
    journal_count,
    only,
    run_phase,
    servers,
)
from guided_ab.store import RunStore


def _mode(mode: str, expected: tuple[str, ...], *, server: dict[str, Any] | None = None,
          check: Callable[[Any], str] | None = None, **workload: Any) -> Callable[[Sandbox], str]:
    """A scenario: a healthy control and a candidate in `mode`; the candidate's records must be in `expected`."""
    def scenario(sb: Sandbox) -> str:
        with servers(sb, mode, **(server or {})) as (control, cand):
            run = run_phase(sb, mode.replace("_", "-"), control.url, cand.url, **workload)
        detail = check_run(run, {"control": all_success, "candidate": only(*expected)}, " or ".join(expected))
        return detail + (f"; {check(run)}" if check else "")
    scenario.__name__ = f"fault_{mode}"
    return scenario


def _candidates(run: Any) -> list:
    return [r for r in run.store.journal("ab") if r.arm == "candidate"]


def _huge_kept(run: Any) -> str:
    sizes = [len(r.output or "") for r in _candidates(run)]
    expect(min(sizes) >= 10 * 1024 * 1024, f"a 10 MB answer was not kept whole: {sizes}")
    return f"answers of {min(sizes) / 1e6:.1f} MB validated and kept"


def _absurd_kept(run: Any) -> str:
    counts = {(r.prompt_tokens, r.completion_tokens) for r in _candidates(run)}
    expect(counts == {(-7, 2**62)}, f"token counts {counts}")
    return "token counts -7 and 2**62 recorded as the server said, the evaluation unaffected"


def _timed_out(run: Any) -> str:
    lat = [r.latency_s or 0.0 for r in _candidates(run)]
    expect(all(0.9 <= x < 3 for x in lat), f"latencies {lat} are not ~ the 1 s timeout")
    return f"ended at the 1 s timeout ({min(lat):.2f}-{max(lat):.2f} s)"


def fault_redirect(sb: Sandbox) -> str:
    with FaultServer("healthy", api_key=sb.key) as other:
        with servers(sb, "redirect", redirect_to=other.url) as (control, cand):
            run = run_phase(sb, "redirect", control.url, cand.url)
        followed = other.stats["chat"]
    detail = check_run(run, {"control": all_success, "candidate": only("server_error")}, "server_error (3xx, not followed)")
    expect(followed == 0, f"the server on the other port got {followed} requests: the redirect was followed")
    expect(all("redirect to" in (r.error or "") for r in _candidates(run)), "the record does not say where it was redirected")
    return f"{detail}; 307 to another port recorded with its Location, never followed"


def _slow_regex(pattern: str, expected: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        suite = sb.write_suite(f"regex-{expected}", {"bait": {"type": "string", "pattern": pattern}})
        with servers(sb, "evil_regex", evil_length=28) as (control, cand):
            t0 = time.monotonic()
            run = run_phase(sb, "regex", control.url, cand.url, suite=suite, size=1, repeats=4, warmup=0, timeout_s=3.0,
                            concurrency=4, validation_timeout_s=0.5)
            took = time.monotonic() - t0
        detail = check_run(run, {"control": all_success, "candidate": only(expected)}, expected)
        worst = max(r.latency_s or 0.0 for r in run.store.journal("ab") if r.arm == "control")
        expect(worst < 1.0, f"a healthy control request took {worst:.1f} s: validation stalled the event loop")
        return f"{detail}; `{pattern}` on 28 'a's and '!': control never stalled (<= {worst:.2f} s), phase {took:.1f} s"
    scenario.__name__ = f"fault_regex_{expected}"
    return scenario


def fault_two_writers(sb: Sandbox) -> str:
    """Two processes' worth of `ab` on one run at once: the second is refused naming the first."""
    from guided_ab import phases
    from guided_ab.errors import PhaseLocked

    with FaultServer("healthy", api_key=sb.key, delay_s=0.2) as srv:
        cfg = sb.config("writers", srv.url, srv.url, size=6, concurrency=2, timeout_s=5.0)
        store = RunStore.create(cfg, f"writers-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sb.log)
        plan = phases.build_plans(cfg, store)["ab"]
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def writer() -> None:
            barrier.wait()
            try:
                phases.run_requests(cfg, RunStore.open(sb.store, store.run_id), "ab")
            except BaseException as err:  # noqa: BLE001 - inspected below
                errors.append(err)

        threads = [threading.Thread(target=writer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned, f"{acc.describe()}: lost {acc.lost}, dup {acc.duplicates}")
    expect(acc.parquet_ok, "the parquet records differ from the journal")
    expect(len(errors) == 1 and isinstance(errors[0], PhaseLocked), f"errors: {errors}")
    expect(f"pid {os.getpid()}" in str(errors[0]), f"the refusal does not name the holder: {errors[0]}")
    return f"second writer refused ({str(errors[0])[:90]}...); {acc.describe()}, 0 lost, 0 dup"


def fault_sigint_phase(sb: Sandbox) -> str:
    """SIGINT to the phase process's group mid-run (a terminal's Ctrl-C): it ends within seconds,
    what it recorded is kept (parquet = journal), and the re-run completes it exactly."""
    from guided_ab import phases
    from guided_ab.selfcheck.faults import _Child

    with FaultServer("healthy", api_key=sb.key, delay_s=0.25) as srv:
        cfg = sb.config("sigint", srv.url, srv.url, size=6, concurrency=2, timeout_s=5.0)
        store = RunStore.create(cfg, f"sigint-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sb.log)
        plan = phases.build_plans(cfg, store)["ab"]
        proc = _Child(sb, store, "interrupted", "phase")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None and journal_count(store, "ab") < 4:
                time.sleep(0.02)
            expect(proc.poll() is None, f"the phase process ended (rc {proc.returncode}) before the interrupt")
            os.killpg(proc.pid, signal.SIGINT)
            t0 = time.monotonic()
            proc.wait(20)
            ended = time.monotonic() - t0
        finally:
            proc.kill()
        kept = len(store.journal("ab"))
        df = store.finalized_records("ab")
        expect(df is not None and len(df) == kept, "the records were not finalized on the way out")
        expect(0 < kept < len(plan.requests), f"interrupted after {kept} of {len(plan.requests)} records")
        phases.run_requests(cfg, store, "ab")
        phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned, f"{acc.describe()}")
    expect(acc.attempts_ok and acc.parquet_ok, "attempts or parquet disagree with the journal")
    return f"SIGINT ended the phase in {ended:.1f} s with {kept} records kept; re-run: {acc.describe()}, 0 lost, 0 dup"


def security_echoed_key(sb: Sandbox) -> str:
    """A server that echoes the Authorization header (in errors and in answers): never written."""
    from guided_ab import phases
    from guided_ab.selfcheck.leaks import leaked_files

    with servers(sb, "echo") as (control, cand):
        run = run_phase(sb, "echo", control.url, cand.url, stream_share=0.5)
    phases.decide_run(run.store)
    # its 400 ("bad request; you sent Authorization: ...") names no grammar: invalid_request
    detail = check_run(run, {"control": all_success, "candidate": only("rejected", "invalid_request", "schema_violation")},
                       "rejected / invalid_request / schema_violation")
    echoed = _candidates(run)
    expect(all("Bearer REDACTED" in (r.error or "") + (r.output or "") for r in echoed), "the echo is not kept, redacted")
    hits = leaked_files(run.store.dir, [sb.key])
    expect(not hits, f"the key was written: {hits}")
    return f"{detail}; kept as 'Bearer REDACTED' in records, parquet and reports"


HOSTILE_BACKEND = "[/bold][link=javascript:alert(1)]x[/link] $\\frac{1}{ <b>*bold*</b> | `tick`"


def security_markup_header(sb: Sandbox) -> str:
    """The backend header is server text: markup in it prints as itself on the terminal and in every report."""
    from rich.console import Console

    from guided_ab import phases
    from guided_ab.reports.console import runs_table, summary_table

    with FaultServer("healthy", api_key=sb.key) as control, \
            FaultServer("healthy", api_key=sb.key, backend=HOSTILE_BACKEND) as cand:
        run = run_phase(sb, "markup", control.url, cand.url)
    decision = phases.decide_run(run.store)
    term = Console(file=io.StringIO(), width=300, color_system=None)
    term.print(summary_table(run.store.dir))
    term.print(runs_table(sb.store))
    shown = term.file.getvalue()  # type: ignore[attr-defined]
    expect("[/bold][link=javascript:alert(1)]x[/link]" in shown, "the header was not shown as the text it is")
    md = run.store.path("report.md").read_text()
    html = run.store.path("report.html").read_text()
    expect("[/bold][link=" not in md and "<b>" not in md, "report.md holds the header as markdown")
    expect("<b>*bold*</b>" not in html, "report.html holds the header as HTML")
    expect("plot unavailable" not in html, "a plot failed on the header (mathtext?)")
    return f"decision {decision['verdict']}; terminal tables, report.md (escaped) and report.html (escaped, plots drawn) all hold it as text"


def _sleeper(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def security_reused_pid(sb: Sandbox) -> str:
    """An old run's endpoints.json (and a reaper record) naming pids that now belong to someone
    else, one even a vLLM-looking server on the arm's port: teardown and reap signal none."""
    import json

    from guided_ab import phases
    from guided_ab.arms import local
    from guided_ab.arms.base import Endpoint
    from guided_ab.arms.vllm_args import SERVER_MODULE
    from guided_ab.config import parse_config

    data = sb.config_data("reused", "http://127.0.0.1:9", "http://127.0.0.1:9")
    for arm in data["arms"]:
        arm.update(target="local")
        del arm["url"], arm["api_key_env"]
    cfg = parse_config(data, "selfcheck")
    store = RunStore.create(cfg, f"reused-{secrets.token_hex(3)}")
    strangers = [_sleeper(), _sleeper(SERVER_MODULE, "--port", "18125"), _sleeper(SERVER_MODULE, "--port", "18126")]
    record = local._record_path("old-run", "x")
    try:
        phases.save_endpoints(store, {
            "control": Endpoint(run_id=store.run_id, arm="control", target="local", base_url="http://127.0.0.1:1", model="m",
                                backend="guidance", pid=strangers[0].pid, port=18125, started_at=time.time() - 3600),
            "candidate": Endpoint(run_id=store.run_id, arm="candidate", target="local", base_url="http://127.0.0.1:18125",
                                  model="m", backend="auto", pid=strangers[1].pid, port=18125, started_at=time.time(),
                                  marker=f"{store.run_id}/candidate/0"),
        })
        entries = phases.teardown(store, log=sb.log)
        record.write_text(json.dumps({"run_id": "old-run", "arm": "x", "pid": strangers[2].pid, "pgid": strangers[2].pid,
                                      "port": 18126, "started_at": time.time() - 7200, "owner_pid": 0, "owner_cmd": ""}))
        reaped = local.reap(run_id="old-run")
        time.sleep(0.3)
        alive = [p.poll() is None for p in strangers]
    finally:
        record.unlink(missing_ok=True)
        for p in strangers:
            p.kill()
            p.wait()
    expect(alive == [True, True, True], f"a stranger was signalled: alive {alive}")
    expect(not any(e["stopped"] for e in entries) and reaped == [], f"teardown {entries}, reap {reaped}")
    return "3 reused pids (one a vLLM look-alike on the arm's port): teardown and reap signalled none"


FAULTS: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("429-storm", _mode("ratelimit", ("rejected",))),
    ("status-999", _mode("status999", ("server_error",))),
    ("html-502", _mode("html_502", ("server_error",))),
    ("redirect-other-port", fault_redirect),
    ("header-200kb", _mode("huge_header", ("connection_error",))),
    # 10 MB through the client and the validator: 2 s (the harness default) timed out once on a loaded CI machine
    ("answer-10mb", _mode("huge_body", ("success",), size=2, timeout_s=20.0, check=_huge_kept)),
    ("invalid-utf8", _mode("bad_utf8", ("invalid_json",))),
    ("stream-no-done", _mode("no_done", ("success",), stream_share=1.0)),
    ("absurd-token-counts", _mode("absurd_tokens", ("success",), check=_absurd_kept)),
    ("http200-empty-body", _mode("empty_body", ("invalid_json",))),
    ("crlf-sse", _mode("crlf_sse", ("success",), stream_share=1.0)),
    ("byte-by-byte-sse", _mode("tiny_chunks", ("success",), stream_share=1.0)),
    ("5000-event-stream", _mode("many_events", ("success",), stream_share=1.0)),
    ("sse-keepalive-comments", _mode("sse_comments", ("success",), stream_share=1.0)),
    ("json-for-a-stream", _mode("json_for_stream", ("success",), stream_share=1.0)),
    ("slow-headers", _mode("slow_headers", ("timeout",), timeout_s=1.0, concurrency=4, check=_timed_out)),
    ("gzip-garbage", _mode("gzip_garbage", ("connection_error",))),
    ("answer-null", _mode("null_answer", ("schema_violation",))),
    ("half-answer-length", _mode("truncated", ("truncated",))),
    ("valid-json-wrong-shape", _mode("wrong", ("schema_violation",))),
    ("grammar-rejected-400", _mode("reject", ("rejected",))),
    ("not-http-at-all", _mode("garbage", ("connection_error",))),
    ("regex-backtracking-bait", _slow_regex("^(a+)+$", "schema_violation")),
    ("regex-past-time-bound", _slow_regex("^(a|a)+$", "validation_timeout")),
    ("two-writers-one-phase", fault_two_writers),
    ("sigint-phase-process", fault_sigint_phase),
]
SECURITY: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("server-echoes-key", security_echoed_key),
    ("markup-in-header", security_markup_header),
    ("reused-pid-not-ours", security_reused_pid),
]

