"""`guided-ab selfcheck`: faults survived, bad inputs refused, nothing lost, no key leaked.

Every fault scenario runs the real pipeline code (config -> RunStore -> deploy of external
endpoints -> build_plans/make_plan -> run_requests/run_plan -> classify -> teardown ->
evaluate) against guided_ab.selfcheck.fault_server on loopback, then checks:
- accounting: exactly one record per planned request (none lost, none twice), every record's
  `attempt` equal to the times its id was sent, the parquet equal to the journal, and the
  evaluation's request_accounting / unique_requests gates passed;
- classification: each arm's outcome classes are the ones the fault must give;
- resumable: re-running the phase with the same run id sends nothing again;
- torn down: teardown.json lists every arm and the fault servers are gone.
Every bad input goes through the real entry points (load_config, parse_config, workload_items,
RunStore) and must end in a ConfigError naming the field or file, with nothing written outside
the store directory and nothing lost from a store that already holds records.
Last, every file the run wrote (records, parquet contents, plans, reports, server and child
logs) is searched for the API key.

The last line is `scenarios=<n> survived=<n> bad_inputs=<n> lost=<n> duplicates=<n> leaked=<n>`;
the exit status is 0 only when every scenario held and lost = duplicates = leaked = 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from guided_ab.config import ConfigError, ExperimentConfig, load_config, parse_config
from guided_ab.plan import Plan
from guided_ab.selfcheck.fault_server import FaultServer, spawn
from guided_ab.store import RunStore

KEY_ENV = "GUIDED_AB_SELFCHECK_KEY"
WRONG_KEY_ENV = "GUIDED_AB_SELFCHECK_WRONG_KEY"
REPO_ROOT = Path(__file__).resolve().parents[2]

# small schemas the fault server's healthy mode answers validly (tests check that it does)
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "minLength": 2},
               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "weather": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 80},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["location", "unit"], "additionalProperties": False},
    "order": {"type": "object", "properties": {"lines": {"type": "array", "minItems": 1, "items": {
              "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
              "required": ["sku", "qty"]}}}, "required": ["lines"]},
    "contact": {"type": "object", "properties": {"email": {"type": "string", "format": "email"},
                "since": {"type": "string", "format": "date"}}, "required": ["email", "since"]},
    "price": {"type": "object", "properties": {"amount": {"type": "number", "exclusiveMinimum": 0},
              "currency": {"const": "EUR"}, "final": {"type": "boolean"}}, "required": ["amount", "currency", "final"]},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
             "id": {"type": "integer", "multipleOf": 7, "minimum": 10}}, "required": ["tags", "id"]},
}


@dataclass
class Result:
    name: str
    kind: str  # fault | bad_input | security
    held: bool
    detail: str
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return f"{'ok  ' if self.held else 'FAIL'} {self.kind:<9} {self.name:<20} {self.seconds:5.1f}s  {self.detail}"


class Failed(AssertionError):
    """A scenario did not hold; the message says what was seen."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


# -- the sandbox every scenario writes into ------------------------------------------------------
class Sandbox:
    """A directory holding the run store, inputs and every captured log of one selfcheck."""

    def __init__(self, root: Path, key: str):
        self.root = root
        self.key = key
        self.store = root / "runs"
        self.logs = root / "logs"
        self.inputs = root / "inputs"
        self.scratch = root / "scratch"  # e.g. a throwaway PREFECT_HOME
        for d in (self.store, self.logs, self.inputs, self.scratch):
            d.mkdir(parents=True, exist_ok=True)
        self.lost = 0
        self.duplicates = 0
        self.extra_keys: list[str] = []  # keys of real servers started (--with-vllm)
        self.suite = self.write_suite("suite", SCHEMAS)

    def tally(self, acc: Accounting) -> Accounting:
        self.lost += acc.lost
        self.duplicates += acc.duplicates
        return acc
        self.suite = self.write_suite("suite", SCHEMAS)

    def log(self, msg: str) -> None:
        with open(self.logs / "selfcheck.log", "a", encoding="utf-8") as f:
            f.write(msg.rstrip("\n") + "\n")

    def write_suite(self, name: str, schemas: dict[str, object], raw: dict[str, str] | None = None) -> Path:
        d = self.inputs / name
        d.mkdir(parents=True, exist_ok=True)
        for stem, schema in schemas.items():
            (d / f"{stem}.json").write_text(json.dumps(schema), encoding="utf-8")
        for stem, text in (raw or {}).items():
            (d / f"{stem}.json").write_text(text, encoding="utf-8")
        return d

    def config_data(self, name: str, control_url: str, candidate_url: str, *, suite: Path | None = None,
                    candidate_key_env: str = KEY_ENV, **workload: object) -> dict:
        wl = {"suite": str(suite or self.suite), "size": 4, "observe_size": 0, "warmup": 1, "max_tokens": 64,
              "concurrency": 2, "timeout_s": 2.0, "stream_share": 0.5, **workload}
        return {
            "name": name,
            "arms": [
                {"name": "control", "role": "control", "target": "external", "backend": "guidance",
                 "url": control_url, "api_key_env": KEY_ENV, "model": "guided-ab-model"},
                {"name": "candidate", "role": "candidate", "target": "external", "backend": "auto",
                 "url": candidate_url, "api_key_env": candidate_key_env, "model": "guided-ab-model"},
            ],
            "workload": wl,
            "decision": {"bootstrap_resamples": 100},
            "store": str(self.store),
            "server_start_timeout_s": 10,
        }

    def config(self, *args: object, **kw: object) -> ExperimentConfig:
        return parse_config(self.config_data(*args, **kw), "selfcheck")  # type: ignore[arg-type]


# -- accounting ----------------------------------------------------------------------------------
@dataclass
class Accounting:
    planned: int
    recorded: int
    lost: int
    duplicates: int
    attempts_ok: bool
    parquet_ok: bool
    by_arm: dict[str, Counter] = field(default_factory=dict)
    retried: int = 0  # records with attempt > 1

    def describe(self) -> str:
        return f"records {self.recorded}/{self.planned}"


def sent_log(store: RunStore, phase: str) -> Counter:
    p = store.path("records", f"{phase}.sent")
    return Counter(x.strip() for x in p.read_text().splitlines() if x.strip()) if p.is_file() else Counter()


def account(store: RunStore, plan: Plan) -> Accounting:
    """Compare what a phase recorded with what it planned (journal, attempt log and parquet)."""
    import pandas as pd

    recs = store.journal(plan.phase)
    planned = {r.request_id for r in plan.requests}
    counts = Counter(r.request_id for r in recs)
    lost = sum(1 for i in planned if counts[i] == 0)
    dups = sum(c - 1 for c in counts.values() if c > 1) + sum(c for i, c in counts.items() if i not in planned)
    sent = sent_log(store, plan.phase)
    attempts_ok = all(r.attempt == sent[r.request_id] for r in recs)
    pq = store.path("records", f"{plan.phase}.parquet")
    parquet_ok = False
    if pq.is_file():
        df = pd.read_parquet(pq)
        parquet_ok = len(df) == len(recs) and Counter(df.request_id) == counts
    by_arm: dict[str, Counter] = {}
    for r in recs:
        by_arm.setdefault(r.arm, Counter())[r.outcome] += 1
    return Accounting(len(plan.requests), len(recs), lost, dups, attempts_ok, parquet_ok, by_arm,
                      sum(1 for r in recs if r.attempt > 1))


def _outcomes(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) != 0


# -- one fault scenario through the pipeline ------------------------------------------------------
@dataclass
class PhaseRun:
    cfg: ExperimentConfig
    store: RunStore
    plan: Plan
    acc: Accounting
    resent: int
    teardown: list[dict]
    gates: dict[str, bool]
    waited_s: float | None = None


def run_phase(sb: Sandbox, name: str, control_url: str, candidate_url: str, *, during: Callable[[RunStore], None] | None = None,
              wait_ready: bool = False, **cfg_kw: object) -> PhaseRun:
    """deploy (external endpoints) -> A/B phase -> the same phase again (resume) -> teardown -> evaluate."""
    from guided_ab import phases
    from guided_ab.arms.external import wait_ready as external_wait_ready

    cfg = sb.config(name, control_url, candidate_url, **cfg_kw)
    store = RunStore.create(cfg, f"{name}-{secrets.token_hex(3)}")
    endpoints = phases.start_endpoints(cfg, store, log=sb.log)
    waited = None
    if wait_ready:
        waited = max(external_wait_ready(ep, cfg.server_start_timeout_s, poll_s=0.1) for ep in endpoints.values())
    plan = phases.build_plans(cfg, store)["ab"]
    watcher = None
    if during is not None:
        watcher = threading.Thread(target=during, args=(store,), daemon=True)
        watcher.start()
    try:
        phases.run_requests(cfg, store, "ab")
        again = phases.run_requests(cfg, store, "ab")  # resumable: the same run id sends nothing twice
    finally:
        entries = phases.teardown(store, log=sb.log)
        if watcher is not None:
            watcher.join(30)
    evaluation = phases.evaluate_run(store)
    gates = {g["name"]: bool(g["passed"]) for g in evaluation.get("gates", [])}
    return PhaseRun(cfg, store, plan, sb.tally(account(store, plan)), again.sent_now, entries, gates, waited)


def check_run(run: PhaseRun, expected: dict[str, Callable[[Counter], bool]], expected_text: str) -> str:
    """The checks every fault scenario shares; returns the detail text."""
    a = run.acc
    expect(a.lost == 0 and a.duplicates == 0, f"{a.describe()}: lost {a.lost}, duplicates {a.duplicates}")
    expect(a.recorded == a.planned, f"{a.describe()}")
    expect(a.attempts_ok, "a record's attempt differs from the times its request was sent")
    expect(a.parquet_ok, "the parquet records differ from the journal")
    expect(run.resent == 0, f"re-running the phase sent {run.resent} requests again")
    for gate in ("request_accounting", "unique_requests"):
        expect(run.gates.get(gate, False), f"evaluation gate {gate} failed")
    expect({e["arm"] for e in run.teardown} == {a.name for a in run.cfg.arms}, "teardown did not cover every arm")
    unattributed = [r.request_id for r in run.store.journal("ab") if r.outcome == "success" and not r.backend]
    expect(not unattributed, f"successful records without the server's backend header: {unattributed[:3]}")
    for arm, ok in expected.items():
        got = a.by_arm.get(arm, Counter())
        expect(ok(got), f"{arm}: got {_outcomes(got)}, expected {expected_text}")
    return (f"{a.describe()}, 0 lost, 0 dup; candidate: {_outcomes(a.by_arm.get('candidate', Counter()))}; "
            f"control: {_outcomes(a.by_arm.get('control', Counter()))}; resumed: {run.resent} re-sent")


def only(*classes: str) -> Callable[[Counter], bool]:
    return lambda c: sum(c.values()) > 0 and set(c) <= set(classes)


def all_success(c: Counter) -> bool:
    return only("success")(c)


@contextmanager
def servers(sb: Sandbox, candidate_mode: str, **opts: object) -> Iterator[tuple[FaultServer, FaultServer]]:
    """A healthy control server and a candidate server in `candidate_mode`, both needing the key."""
    with FaultServer("healthy", api_key=sb.key) as control, FaultServer(candidate_mode, api_key=sb.key, backend="xgrammar", **opts) as cand:
        yield control, cand
    expect(port_closed(control.url) and port_closed(cand.url), "a fault server still accepts connections")


# -- fault scenarios -----------------------------------------------------------------------------
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
    return f"{detail}; latency {min(lat):.2f}-{max(lat):.2f} s at timeout_s=1"


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
    slow = [r.latency_s for r in recs if r.arm == "candidate"]
    fast = [r.latency_s for r in recs if r.arm == "control"]
    expect(min(slow) >= 0.4, f"trickle latencies {slow} shorter than the 6 x 0.08 s trickle")
    expect(sorted(fast)[len(fast) // 2] < min(slow), "the healthy arm was not faster than the trickling one")
    streamed = [r for r in recs if r.arm == "candidate" and r.stream]
    expect(all(r.ttft_s is not None and r.ttft_s < r.latency_s for r in streamed), "a trickled stream has no TTFT below its latency")
    return f"{detail}; latency {min(slow):.2f}-{max(slow):.2f} s vs control <= {max(fast):.2f} s"


def _journal_count(store: RunStore, phase: str, needle: str = "") -> int:
    p = store.journal_path(phase)
    if not p.is_file():
        return 0
    return sum(1 for line in p.read_text(errors="replace").splitlines() if line.endswith("}") and needle in line)


def fault_server_killed(sb: Sandbox) -> str:
    """A real server process SIGKILLed mid-phase: what it answered stays, the rest is connection_error."""
    killed = {}
    with FaultServer("healthy", api_key=sb.key) as control, \
            spawn("healthy", api_key=sb.key, delay_s=0.3, log_path=str(sb.logs / "fault-server-killed.log")) as proc:

        def kill_after_two(store: RunStore) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if _journal_count(store, "ab", '"arm":"candidate"') >= 2:
                    break
                time.sleep(0.05)
            proc.kill()
            killed["at"] = _journal_count(store, "ab")

        run = run_phase(sb, "killed", control.url, proc.url, during=kill_after_two, timeout_s=2.0, size=5)
        expect(not proc.alive(), "the killed server process is still alive")
    detail = check_run(run, {"control": all_success, "candidate": only("success", "connection_error")},
                       "success before the kill, connection_error after")
    c = run.acc.by_arm["candidate"]
    expect(c["success"] >= 2 and c["connection_error"] >= 1, f"candidate: {_outcomes(c)}: the kill did not land mid-phase")
    return f"{detail}; SIGKILL after {killed.get('at')} records; torn down"


CHILD = "import sys; from guided_ab.selfcheck.scenarios import child_phase; child_phase(*sys.argv[1:])"


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
            while time.monotonic() < deadline and proc.poll() is None and _journal_count(store, "ab") < 4:
                time.sleep(0.02)
            expect(proc.poll() is None, f"the phase process ended (rc {proc.returncode}) before it could be killed")
            expect(_journal_count(store, "ab") >= 4, "the phase process recorded nothing in time")
        finally:
            proc.kill()
        before = {r.request_id for r in store.journal("ab")}
        sent_before = sent_log(store, "ab")
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
            from guided_ab.arms.base import resolve_key

            vllm_key = resolve_key(ep.key_ref)
            sb.extra_keys.append(vllm_key)
            phases.wait_endpoints(cfg, store, endpoints, log=sb.log)
            plan = phases.build_plans(cfg, store)["ab"]

            def kill_after_two(st: RunStore) -> None:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and _journal_count(st, "ab", '"arm":"candidate"') < 2:
                    time.sleep(0.1)
                os.killpg(ep.pid, signal.SIGKILL)

            watcher = threading.Thread(target=kill_after_two, args=(store,), daemon=True)
            watcher.start()
            phases.run_requests(cfg, store, "ab")
            watcher.join(30)
        finally:
            entries = phases.teardown(store, log=sb.log)
    acc = sb.tally(account(store, plan))
    c = acc.by_arm.get("candidate", Counter())
    expect(acc.lost == 0 and acc.duplicates == 0 and acc.recorded == acc.planned, f"{acc.describe()}")
    expect(c["connection_error"] >= 1 and set(c) - {"connection_error"}, f"candidate: {_outcomes(c)}")
    expect(not local._alive(ep.pid), "the vLLM server process is still alive after teardown")
    expect(not [r for r in local.leftovers() if r["run_id"] == store.run_id], "a server record was left for the reaper")
    expect({e["arm"] for e in entries} == {"control", "candidate"}, "teardown did not cover every arm")
    return f"vLLM SIGKILLed mid-phase: {acc.describe()}, 0 lost, 0 dup; candidate: {_outcomes(c)}; torn down"


# -- bad inputs ----------------------------------------------------------------------------------
def _tree(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, str]:
    """path -> sha256 of every file under root (outside `exclude`)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == e or e in p.parents for e in exclude):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


def refused(fn: Callable[[], object], *needles: str) -> str:
    """fn must raise ConfigError whose message names every needle; returns the first line."""
    try:
        fn()
    except ConfigError as err:
        msg = str(err)
        missing = [n for n in needles if n not in msg]
        expect(not missing, f"the error does not name {missing}: {msg[:300]}")
        text = " | ".join(x.strip() for x in msg.splitlines() if x.strip())
        return text if len(text) <= 150 else text[:147] + "..."
    except Exception as err:  # noqa: BLE001 - anything but a ConfigError is a failed scenario
        raise Failed(f"{type(err).__name__} instead of a clear ConfigError: {str(err)[:200]}") from None
    raise Failed("accepted")


def _yaml_file(sb: Sandbox, name: str, data: object | str) -> Path:
    import yaml

    p = sb.inputs / f"{name}.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return p


def _good(sb: Sandbox) -> dict:
    return sb.config_data("badinput", "http://127.0.0.1:9", "http://127.0.0.1:9")


def bad_invalid_yaml(sb: Sandbox) -> str:
    p = _yaml_file(sb, "invalid", "name: x\narms: [\n  {name: a, role: control\n")
    return refused(lambda: load_config(p), str(p), "not valid YAML")


def bad_unknown_keys(sb: Sandbox) -> str:
    d = _good(sb)
    d["arms"][0]["backnd"] = "guidance"
    d["wokload"] = {}
    p = _yaml_file(sb, "unknown-keys", d)
    return refused(lambda: load_config(p), str(p), "arms.0.backnd", "wokload", "unknown field")


def bad_sizes(sb: Sandbox) -> str:
    cases = {"size": 0, "observe_size": -1, "concurrency": 0, "timeout_s": -1.0, "max_tokens": 0, "warmup": -1,
             "repeats": 0, "max_schema_bytes": 0}
    for k, v in cases.items():
        d = _good(sb)
        d["workload"][k] = v
        p = _yaml_file(sb, f"size-{k}", d)
        refused(lambda: load_config(p), str(p), f"workload.{k}")
    d = _good(sb)
    d["workload"]["size"] = 10_000
    from guided_ab.phases import workload_items

    return f"{len(cases)} fields refused by name; " + refused(lambda: workload_items(parse_config(d, "c")), "workload.size")


def bad_backend(sb: Sandbox) -> str:
    d = _good(sb)
    d["arms"][1]["backend"] = "fastgrammar"
    p = _yaml_file(sb, "backend", d)
    return refused(lambda: load_config(p), str(p), "arms.1.backend", "fastgrammar")


def _workload_refused(sb: Sandbox, suite: Path, *needles: str, **wl: object) -> str:
    from guided_ab.phases import workload_items

    d = _good(sb)
    d["workload"].update({"suite": str(suite), "size": 1, **wl})
    cfg = parse_config(d, "c")
    return refused(lambda: workload_items(cfg), *needles)


def bad_invalid_schemas(sb: Sandbox) -> str:
    cases = {
        "bad-type": ('{"type": "objekt"}', "not a valid JSON schema"),
        "bad-minimum": ('{"type": "integer", "minimum": "zero"}', "not a valid JSON schema"),
        "not-json": ('{"type": "object", ', "cannot read the schema"),
        "a-list": ('[{"type": "object"}]', "must be an object"),
    }
    for stem, (text, needle) in cases.items():
        suite = sb.write_suite(f"invalid-{stem}", {}, {stem: text})
        _workload_refused(sb, suite, stem, needle)
    return f"{len(cases)} schema files refused, each named: " + ", ".join(cases)


def bad_huge_schema(sb: Sandbox) -> str:
    big = {"type": "object", "properties": {"code": {"type": "string", "enum": [f"code-{i:07d}" for i in range(80_000)]}},
           "required": ["code"]}
    suite = sb.write_suite("huge", {"huge": big, **{k: SCHEMAS[k] for k in ("person",)}})
    size = (suite / "huge.json").stat().st_size
    expect(size > 1_000_000, f"the huge schema is only {size} bytes")
    msg = _workload_refused(sb, suite, "huge", "max_schema_bytes", size=2)
    # with the limit raised on purpose, the same schema is sent and recorded like any other
    with FaultServer("healthy", api_key=sb.key) as srv:
        run = run_phase(sb, "huge", srv.url, srv.url, suite=suite, size=2, warmup=0, max_schema_bytes=2_000_000)
    check_run(run, {"control": all_success, "candidate": all_success}, "success")
    return f"{size / 1e6:.1f} MB refused ({msg}); with max_schema_bytes raised: {run.acc.describe()}, all success"


def bad_deep_schema(sb: Sandbox) -> str:
    from guided_ab.workload import check_schema

    depth = 5000
    text = '{"type":"object","properties":{"a":' * depth + "{}" + "}}" * depth
    suite = sb.write_suite("deep", {}, {"deep": text})
    msg = _workload_refused(sb, suite, "deep", "nested too deeply")
    nested: dict = {}
    for _ in range(depth):
        nested = {"type": "object", "properties": {"a": nested}}
    refused(lambda: check_schema(nested, "deep-in-memory", 10**9), "deep-in-memory", "nested too deeply")
    return f"{depth} levels (file and in memory) refused: {msg}"


def bad_stalling_schema(sb: Sandbox) -> str:
    """A schema whose grammar compile never ends: for us, a server that never answers that request.
    The per-request timeout ends it; it is recorded once as `timeout` and the rest goes on."""
    suite = sb.write_suite("stall", {**SCHEMAS, "fault-stall": {"type": "object", "properties": {"x": {"type": "string"}}}})
    with FaultServer("healthy", api_key=sb.key, stall_s=30) as control, FaultServer("healthy", api_key=sb.key, stall_s=30) as cand:
        run = run_phase(sb, "stallschema", control.url, cand.url, suite=suite, size=7, timeout_s=1.0, concurrency=4)
    check_run(run, {"control": only("success", "timeout"), "candidate": only("success", "timeout")}, "success + timeout")
    recs = run.store.journal("ab")
    stalled = [r for r in recs if r.schema_id.endswith("fault-stall")]
    expect(len(stalled) == 2 and all(r.outcome == "timeout" for r in stalled), f"stalling schema records: {[r.outcome for r in stalled]}")
    expect(all(r.outcome == "success" for r in recs if r not in stalled), "another schema did not succeed")
    return f"compile stall -> timeout after 1 s on both arms, recorded once each; {run.acc.describe()}, others success"


def bad_unwritable_store(sb: Sandbox) -> str:
    blocker = sb.inputs / "a-regular-file"
    blocker.write_text("not a directory\n")
    d = _good(sb)
    d["store"] = str(blocker / "runs")
    cfg = parse_config(d, "c")
    msg = refused(lambda: RunStore.create(cfg, "r1"), "store", str(blocker / "runs"))
    expect(blocker.read_text() == "not a directory\n", "the blocking file was changed")
    return msg


def bad_run_ids(sb: Sandbox) -> str:
    from guided_ab import phases

    cfg = parse_config(_good(sb), "c")
    existing = RunStore.create(cfg, "existing-run")
    from guided_ab.records import RequestRecord

    for i in range(3):
        existing.append_record(RequestRecord(
            run_id=existing.run_id, phase="ab", arm="control", request_id=f"ab-{i:06d}-control", schema_id="s",
            subset="x", order_index=i, pair_index=i, warmup=False, first_for_schema=True, stream=False, attempt=1,
            sent_at=time.time(), outcome="success", latency_s=0.1))
    before = _tree(sb.store)
    bad = ["../x", "a/b", "..", "/tmp/guided-ab-escape", "x/../../y", "existing-run/../../z", "a\x00b"]
    for rid in bad:
        refused(lambda: RunStore.create(cfg, rid), "run id")
        refused(lambda: RunStore.open(sb.store, rid), "run id")
    refused(lambda: RunStore.open(sb.store, ""), "run id")
    expect(_tree(sb.store) == before, "the store changed")
    expect(len(existing.journal("ab")) == 3, "the existing run lost records")
    expect(not (sb.store.parent / "x").exists() and not Path("/tmp/guided-ab-escape").exists(), "something was written outside")
    phases.teardown(existing, log=sb.log)  # nothing to stop: a no-op that must not fail
    return f"{len(bad)} run ids refused (create and open); existing run keeps its 3 records; store unchanged"


# -- leak check ----------------------------------------------------------------------------------
def leaked_files(root: Path, keys: list[str], exclude: tuple[Path, ...] = ()) -> list[str]:
    """Files under root holding any key: raw bytes, and the decoded contents of parquet files."""
    import pandas as pd

    hits = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(e in p.parents for e in exclude):
            continue
        data = p.read_bytes()
        texts = [data]
        if p.suffix == ".parquet":
            try:
                df = pd.read_parquet(p)
                texts.append(df.to_csv(index=False).encode())
            except Exception:  # noqa: BLE001 - an unreadable parquet is searched as bytes only
                pass
        if any(k.encode() in t for k in keys for t in texts):
            hits.append(str(p))
    return hits


# -- the command ---------------------------------------------------------------------------------
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
BAD_INPUTS: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("invalid-yaml", bad_invalid_yaml),
    ("unknown-keys", bad_unknown_keys),
    ("zero-negative-sizes", bad_sizes),
    ("unknown-backend", bad_backend),
    ("invalid-json-schemas", bad_invalid_schemas),
    ("schema-over-1mb", bad_huge_schema),
    ("schema-5000-deep", bad_deep_schema),
    ("stalling-schema", bad_stalling_schema),
    ("unwritable-store", bad_unwritable_store),
    ("run-id-path-chars", bad_run_ids),
]


def run_scenario(sb: Sandbox, name: str, kind: str, fn: Callable[[Sandbox], str]) -> Result:
    allowed = (sb.store, sb.logs, sb.inputs, sb.scratch)
    outside_before = _tree(sb.root, exclude=allowed)
    counted = (sb.lost, sb.duplicates)
    sb.log(f"--- {kind} {name}")
    t0 = time.monotonic()
    try:
        detail = fn(sb)
        held = True
    except Failed as err:
        detail, held = str(err), False
    except Exception as err:  # noqa: BLE001 - a crash is a scenario that did not hold
        detail, held = f"crashed: {type(err).__name__}: {str(err)[:300]}", False
    outside_after = _tree(sb.root, exclude=allowed)
    if outside_after != outside_before:
        new = sorted(set(outside_after) - set(outside_before))[:3]
        held, detail = False, f"{detail}; wrote outside the store: {new}"
    sb.log(f"{'held' if held else 'FAILED'}: {detail}")
    detail = detail.replace(str(sb.root), "<sandbox>")
    return Result(name, kind, held, detail, sb.lost - counted[0], sb.duplicates - counted[1], time.monotonic() - t0)


def selfcheck(*, with_vllm: bool = False, with_prefect: bool = False, keep: bool = False, workdir: Path | None = None,
              only_names: list[str] | None = None, echo: Callable[[str], None] = print) -> int:
    """Run every scenario, print one line each and the summary line; returns the exit status."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="guided-ab-selfcheck-"))
    key = "gab-selfcheck-" + secrets.token_urlsafe(24)
    sb = Sandbox(root, key)
    faults = list(FAULTS)
    if with_prefect:
        faults.append(("prefect-flow-killed", lambda s: fault_flow_killed(s, how="prefect")))
    if with_vllm:
        faults.append(("vllm-server-killed", fault_vllm_killed))
    plan = [(n, "fault", f) for n, f in faults] + [(n, "security", f) for n, f in SECURITY] + \
           [(n, "bad_input", f) for n, f in BAD_INPUTS]
    if only_names:
        plan = [p for p in plan if p[0] in only_names]
    results: list[Result] = []
    old_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    t0 = time.monotonic()
    try:
        for name, kind, fn in plan:
            r = run_scenario(sb, name, kind, fn)
            results.append(r)
            echo(r.line())
        hits = leaked_files(root, [key, *sb.extra_keys])
    finally:
        if old_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old_key
    lost = sum(r.lost for r in results)
    dups = sum(r.duplicates for r in results)
    for h in hits:
        echo(f"FAIL leak      {Path(h).relative_to(root)} holds the API key")
    survived = sum(r.held for r in results)
    bad_inputs = sum(1 for r in results if r.kind == "bad_input")
    echo(f"(sandbox {root}{'' if keep or workdir else ', removed'}; {time.monotonic() - t0:.0f} s)")
    if not keep and not workdir:
        shutil.rmtree(root, ignore_errors=True)
    echo(f"scenarios={len(results)} survived={survived} bad_inputs={bad_inputs} lost={lost} duplicates={dups} leaked={len(hits)}")
    return 0 if survived == len(results) and lost == 0 and dups == 0 and not hits else 1

