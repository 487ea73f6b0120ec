"""The fault scenarios: servers that fail in every way a real one can (503 storm, stall, reset,
malformed or cut streams, HTTP 200 garbage, trickle, SIGKILL), the phase process itself
SIGKILLed, a torn journal line, and a wrong API key. Each runs the real pipeline code against
guided_ab.selfcheck.fault_server on loopback and must end with one record per planned request
in the outcome class the fault must give (see guided_ab.selfcheck.harness.check_run).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from guided_ab.config import parse_config
from guided_ab.selfcheck.fault_server import FaultServer, spawn
from guided_ab.selfcheck.harness import (
    REPO_ROOT,
    WRONG_KEY_ENV,
    Failed,
    Sandbox,
    account,
    all_success,
    check_run,
    expect,
    journal_count,
    only,
    outcomes_text,
    port_closed,
    run_phase,
    servers,
)
from guided_ab.store import RunStore


def fault_storm(sb: Sandbox) -> str:
    with servers(sb, "storm", storm_requests=3, cold_start_s=0.5) as (control, cand):
        run = run_phase(sb, "storm", control.url, cand.url, wait_ready=True)
        cold_503s = cand.stats["cold"]
    c = run.acc.by_arm.get("candidate", Counter())
    detail = check_run(run, {"control": all_success, "candidate": only("server_error", "success")},
                       "server_error then success")
    expect(c["server_error"] == 3, f"candidate: {c['server_error']} server_error records, expected 3 (the storm)")
    expect(cold_503s >= 1 and run.waited_s is not None, "wait_ready saw no cold-start 503")
    return f"{detail}; deploy waited {run.waited_s:.1f} s through {cold_503s} cold-start 503s"


def fault_stall(sb: Sandbox) -> str:
    with servers(sb, "stall", stall_s=30) as (control, cand):
        run = run_phase(sb, "stall", control.url, cand.url, timeout_s=1.0, concurrency=4)
    detail = check_run(run, {"control": all_success, "candidate": only("timeout")}, "timeout only")
    lat = [r.latency_s for r in run.store.journal("ab") if r.arm == "candidate"]
    expect(all(x is not None and 0.9 <= x < 5 for x in lat), f"timeout latencies {lat} are not ~ the 1 s timeout")
    lat_s = [x for x in lat if x is not None]
    return f"{detail}; latency {min(lat_s):.2f}-{max(lat_s):.2f} s at timeout_s=1"


def fault_reset(sb: Sandbox) -> str:
    with servers(sb, "reset") as (control, cand):
        run = run_phase(sb, "reset", control.url, cand.url)
    return check_run(run, {"control": all_success, "candidate": only("connection_error")}, "connection_error only")


def fault_malformed_sse(sb: Sandbox) -> str:
    with servers(sb, "malformed_sse") as (control, cand):
        run = run_phase(sb, "malformed", control.url, cand.url, stream_share=1.0)
    return check_run(run, {"control": all_success, "candidate": only("invalid_json")}, "invalid_json only")


def fault_cut_sse(sb: Sandbox) -> str:
    with servers(sb, "cut_sse") as (control, cand):
        run = run_phase(sb, "cut", control.url, cand.url, stream_share=1.0)
    return check_run(run, {"control": all_success, "candidate": only("connection_error")}, "connection_error only")


def fault_non_json(sb: Sandbox) -> str:
    with servers(sb, "non_json") as (control, cand):
        run = run_phase(sb, "nonjson", control.url, cand.url, stream_share=0.5)
    streams = Counter(r.stream for r in run.store.journal("ab") if r.arm == "candidate")
    detail = check_run(run, {"control": all_success, "candidate": only("invalid_json")}, "invalid_json only")
    return f"{detail} ({streams[True]} streamed, {streams[False]} not)"


def fault_trickle(sb: Sandbox) -> str:
    with servers(sb, "trickle", trickle_s=0.08, pieces=6) as (control, cand):
        run = run_phase(sb, "trickle", control.url, cand.url, stream_share=0.5, concurrency=4)
    detail = check_run(run, {"control": all_success, "candidate": only("success")}, "success only")
    recs = run.store.journal("ab")
    expect(all(r.latency_s is not None for r in recs), "a record has no latency")
    slow = [r.latency_s or 0.0 for r in recs if r.arm == "candidate"]
    fast = [r.latency_s or 0.0 for r in recs if r.arm == "control"]
    expect(min(slow) >= 0.4, f"trickle latencies {slow} shorter than the 6 x 0.08 s trickle")
    expect(sorted(fast)[len(fast) // 2] < min(slow), "the healthy arm was not faster than the trickling one")
    streamed = [r for r in recs if r.arm == "candidate" and r.stream]
    expect(all(r.ttft_s is not None and r.latency_s is not None and r.ttft_s < r.latency_s for r in streamed),
           "a trickled stream has no TTFT below its latency")
    return f"{detail}; latency {min(slow):.2f}-{max(slow):.2f} s vs control <= {max(fast):.2f} s"


def fault_server_killed(sb: Sandbox) -> str:
    """A real server process SIGKILLed mid-phase: what it answered stays, the rest is connection_error."""
    killed = {}
    with FaultServer("healthy", api_key=sb.key) as control, \
            spawn("healthy", api_key=sb.key, delay_s=0.3, log_path=str(sb.logs / "fault-server-killed.log")) as proc:

        def kill_after_two(store: RunStore) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if journal_count(store, "ab", arm="candidate") >= 2:
                    break
                time.sleep(0.05)
            proc.kill()
            killed["at"] = journal_count(store, "ab")

        run = run_phase(sb, "killed", control.url, proc.url, during=kill_after_two, timeout_s=2.0, size=5)
        expect(not proc.alive(), "the killed server process is still alive")
    detail = check_run(run, {"control": all_success, "candidate": only("success", "connection_error")},
                       "success before the kill, connection_error after")
    c = run.acc.by_arm["candidate"]
    expect(c["success"] >= 2 and c["connection_error"] >= 1, f"candidate: {outcomes_text(c)}: the kill did not land mid-phase")
    return f"{detail}; SIGKILL after {killed.get('at')} records; torn down"


CHILD = "import sys; from guided_ab.selfcheck.faults import child_phase; child_phase(*sys.argv[1:])"


def child_phase(store_root: str, run_id: str, phase: str, how: str = "phase") -> None:
    """The body of the process the flow-kill scenario SIGKILLs: one phase, as the flow runs it."""
    if how == "prefect":
        from flows.ab import ab

        ab(run_id=run_id, store=store_root)
        return
    from guided_ab import phases

    store = RunStore.open(store_root, run_id)
    res = phases.run_requests(store.load_config(), store, phase)
    print(f"phase {phase}: planned {res.planned}, recorded before {res.recorded_before}, sent now {res.sent_now}")


class _Child:
    """The process a phase runs in: `exec` (a fresh interpreter: the Prefect flow) or a fork of
    this process (the phase alone; no second ~5-10 s of imports on a busy machine). Either way
    a separate process in its own session, SIGKILLed as a crash would."""

    def __init__(self, sb: Sandbox, store: RunStore, tag: str, how: str):
        log_path = sb.logs / f"child-{store.run_id}-{tag}.log"
        self.returncode: int | None = None
        self._popen: subprocess.Popen | None = None
        if how == "prefect":
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
            env["PREFECT_HOME"] = str(sb.scratch / "prefect")
            # results persisted (base64 pickles) in the sandbox: the leak scan decodes them too
            env.update(PREFECT_RESULTS_PERSIST_BY_DEFAULT="true", PREFECT_LOCAL_STORAGE_PATH=str(sb.scratch / "prefect-results"))
            env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
            with open(log_path, "ab") as log:
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(store.root), store.run_id, "ab", how], cwd=str(REPO_ROOT),
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self.pid = self._popen.pid
            return
        pid = os.fork()
        if pid == 0:  # the child: run the phase, never return into the caller's code
            code = 1
            try:
                os.setsid()
                # a phase started from a terminal: Ctrl-C raises KeyboardInterrupt. A fork inherits
                # whatever SIGINT handler (or mask) earlier work in this process left, e.g. another
                # test's flow run in a long pytest session, which made a SIGINT here do nothing
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
                child_phase(str(store.root), store.run_id, "ab", how)
                code = 0
            except BaseException:  # noqa: BLE001 - reported in the log and the exit status
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        if self._popen is not None:
            self.returncode = self._popen.poll()
        elif self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("phase child", timeout)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        """SIGKILL the child and everything in its session (a Prefect flow's temporary server too)."""
        if self.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)  # a fork killed before its setsid()
        except ProcessLookupError:
            pass
        self.wait(10)


def fault_flow_killed(sb: Sandbox, how: str = "phase") -> str:
    """The process running the phase is SIGKILLed mid-run; the same phase re-run with the same
    run id completes it: one record per planned request, in-flight requests sent again as attempt 2."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key, delay_s=0.25) as srv:
        cfg = sb.config("flowkill", srv.url, srv.url, size=6, concurrency=2, timeout_s=5.0)
        store = RunStore.create(cfg, f"flowkill-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sb.log)
        plan = phases.build_plans(cfg, store)["ab"]
        proc = _Child(sb, store, "killed", how)
        deadline = time.monotonic() + (240 if how == "prefect" else 60)
        try:
            while time.monotonic() < deadline and proc.poll() is None and journal_count(store, "ab") < 4:
                time.sleep(0.02)
            expect(proc.poll() is None, f"the phase process ended (rc {proc.returncode}) before it could be killed")
            expect(journal_count(store, "ab") >= 4, "the phase process recorded nothing in time")
        finally:
            proc.kill()
        before = {r.request_id for r in store.journal("ab")}
        sent_before = store.sent_counts("ab")
        in_flight = set(sent_before) - before
        expect(0 < len(before) < len(plan.requests), f"killed after {len(before)} of {len(plan.requests)} records")
        proc = _Child(sb, store, "resumed", how)
        try:
            rc = proc.wait(240 if how == "prefect" else 60)
        finally:
            proc.kill()
        expect(rc == 0, f"the resumed phase failed (rc {rc}); see {sb.logs}")
        entries = phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned,
           f"{acc.describe()}: lost {acc.lost}, duplicates {acc.duplicates}")
    expect(acc.attempts_ok, "a record's attempt differs from the times its request was sent")
    expect(acc.parquet_ok, "the parquet records differ from the journal")
    recs = {r.request_id: r for r in store.journal("ab")}
    expect(all(recs[i].attempt == 2 for i in in_flight), "an in-flight request was not re-sent as attempt 2")
    expect(all(recs[i].attempt == 1 for i in before), "a recorded request was sent again")
    expect(all_success(Counter(r.outcome for r in recs.values())), "not every request succeeded after the resume")
    expect({e["arm"] for e in entries} == {"control", "candidate"}, "teardown did not cover every arm")
    expect(port_closed(srv.url), "the server still accepts connections")
    via = "Prefect flow `ab`" if how == "prefect" else "phase process"
    return (f"{via} SIGKILLed after {len(before)}/{acc.planned} records ({len(in_flight)} in flight); "
            f"re-run: {acc.describe()}, 0 lost, 0 dup, {acc.retried} sent again as attempt 2")


def fault_torn_journal(sb: Sandbox) -> str:
    """Killed while writing a record: the journal ends in half a line; the re-run still records
    every planned request exactly once."""
    from guided_ab import phases

    with FaultServer("healthy", api_key=sb.key) as srv:
        cfg = sb.config("torn", srv.url, srv.url, size=3)
        store = RunStore.create(cfg, f"torn-{secrets.token_hex(3)}")
        phases.start_endpoints(cfg, store, log=sb.log)
        plan = phases.build_plans(cfg, store)["ab"]
        phases.run_requests(cfg, store, "ab")
        # the fault itself: the journal's bytes cut below the store, as a crash mid-write leaves them
        p = store.journal_path("ab")
        lines = p.read_text().splitlines(keepends=True)
        kept, dropped = lines[:-3], lines[-3:]
        p.write_text("".join(kept) + dropped[0][: len(dropped[0]) // 2])  # the last 3 never (fully) written
        res = phases.run_requests(cfg, store, "ab")
        phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    expect(res.sent_now == 3, f"the re-run sent {res.sent_now} requests, expected the 3 unrecorded")
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned,
           f"{acc.describe()}: lost {acc.lost}, duplicates {acc.duplicates}")
    expect(acc.attempts_ok and acc.parquet_ok, "attempts or parquet disagree with the journal")
    return f"torn last line + 2 unrecorded; re-run sent 3: {acc.describe()}, 0 lost, 0 dup, {acc.retried} as attempt 2"


def security_api_key(sb: Sandbox) -> str:
    """Every /v1 endpoint needs the key: a wrong key gives 401 records (rejected), never a success."""
    import httpx

    os.environ[WRONG_KEY_ENV] = "wrong-" + secrets.token_hex(8)
    try:
        with servers(sb, "healthy") as (control, cand):
            for url in (control.url, cand.url):
                expect(httpx.get(url + "/v1/models", timeout=5).status_code == 401, "GET /v1/models without a key was not 401")
                expect(httpx.post(url + "/v1/chat/completions", json={}, timeout=5).status_code == 401,
                       "POST /v1/chat/completions without a key was not 401")
                expect(httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {sb.key}"}, timeout=5).status_code == 200,
                       "GET /v1/models with the key was not 200")
            run = run_phase(sb, "auth", control.url, cand.url, candidate_key_env=WRONG_KEY_ENV)
    finally:
        os.environ.pop(WRONG_KEY_ENV, None)
    detail = check_run(run, {"control": all_success, "candidate": only("rejected")}, "rejected (401) only")
    expect(all(r.http_status == 401 for r in run.store.journal("ab") if r.arm == "candidate"), "a candidate record is not HTTP 401")
    return f"no key / wrong key -> 401; {detail}"


def fault_vllm_killed(sb: Sandbox) -> str:
    """A real local vLLM server SIGKILLed mid-phase (needs .venv-vllm); teardown and reap clean up."""
    from guided_ab import phases
    from guided_ab.arms import local

    if not (REPO_ROOT / ".venv-vllm" / "bin" / "python").exists() and not os.environ.get("GUIDED_AB_VLLM_PYTHON"):
        raise Failed("no .venv-vllm (run scripts/install.sh) and no GUIDED_AB_VLLM_PYTHON")
    with FaultServer("healthy", api_key=sb.key) as control:
        data = sb.config_data("vllmkill", control.url, "http://unused", size=4, concurrency=1, timeout_s=120,
                              max_tokens=48, stream_share=1.0)
        cand = data["arms"][1]
        cand.update(target="local", model="smollm2-135m", server_args=["--enforce-eager", "--dtype", "float32",
                                                                        "--max-model-len", "2048", "--max-num-seqs", "2"])
        del cand["url"], cand["api_key_env"]
        data["server_start_timeout_s"] = 900
        cfg = parse_config(data, "selfcheck vllm")
        store = RunStore.create(cfg, f"vllmkill-{secrets.token_hex(3)}")
        try:
            endpoints = phases.start_endpoints(cfg, store, log=sb.log)
            ep = endpoints["candidate"]
            if ep.pid is None:
                raise Failed("the local vLLM endpoint has no process id")
            pid = ep.pid
            from guided_ab.arms.base import resolve_key

            vllm_key = resolve_key(ep.key_ref)
            if vllm_key:
                sb.extra_keys.append(vllm_key)
            phases.wait_endpoints(cfg, store, endpoints, log=sb.log)
            plan = phases.build_plans(cfg, store)["ab"]

            def kill_after_two(st: RunStore) -> None:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and journal_count(st, "ab", arm="candidate") < 2:
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)

            watcher = threading.Thread(target=kill_after_two, args=(store,), daemon=True)
            watcher.start()
            phases.run_requests(cfg, store, "ab")
            watcher.join(30)
        finally:
            entries = phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    c = acc.by_arm.get("candidate", Counter())
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned, f"{acc.describe()}")
    expect(c["connection_error"] >= 1 and bool(set(c) - {"connection_error"}), f"candidate: {outcomes_text(c)}")
    expect(not local._alive(pid), "the vLLM server process is still alive after teardown")
    expect(not [r for r in local.leftovers() if r["run_id"] == store.run_id], "a server record was left for the reaper")
    expect({e["arm"] for e in entries} == {"control", "candidate"}, "teardown did not cover every arm")
    return f"vLLM SIGKILLed mid-phase: {acc.describe()}, 0 lost, 0 dup; candidate: {outcomes_text(c)}; torn down"


FAULTS: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("503-storm", fault_storm),
    ("stall-past-timeout", fault_stall),
    ("connection-reset", fault_reset),
    ("malformed-sse", fault_malformed_sse),
    ("cut-sse", fault_cut_sse),
    ("http200-non-json", fault_non_json),
    ("slow-trickle", fault_trickle),
    ("server-killed", fault_server_killed),
    ("flow-process-killed", fault_flow_killed),
    ("torn-journal-line", fault_torn_journal),
]
SECURITY: list[tuple[str, Callable[[Sandbox], str]]] = [("api-key-required", security_api_key)]
