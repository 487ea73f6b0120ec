"""What every selfcheck scenario shares: the sandbox it writes into, the accounting of a phase
against its plan, one A/B phase through the real pipeline code, and the checks every fault
scenario makes of it (see guided_ab.selfcheck.scenarios for the list of scenarios).

A scenario is a function `(Sandbox) -> str`: it returns a one-line detail when it held and
raises Failed (through `expect`) with what was seen when it did not.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guided_ab.config import ExperimentConfig, parse_config
from guided_ab.plan import Plan
from guided_ab.selfcheck.fault_server import FaultServer
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

    def log(self, msg: str) -> None:
        with open(self.logs / "selfcheck.log", "a", encoding="utf-8") as f:
            f.write(msg.rstrip("\n") + "\n")

    def write_suite(self, name: str, schemas: Mapping[str, object], raw: dict[str, str] | None = None) -> Path:
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


def account(store: RunStore, plan: Plan) -> Accounting:
    """Compare what a phase recorded with what it planned (journal, attempt log and parquet)."""
    recs = store.journal(plan.phase)
    planned = {r.request_id for r in plan.requests}
    counts = Counter(r.request_id for r in recs)
    lost = sum(1 for i in planned if counts[i] == 0)
    dups = sum(c - 1 for c in counts.values() if c > 1) + sum(c for i, c in counts.items() if i not in planned)
    sent = store.sent_counts(plan.phase)
    attempts_ok = all(r.attempt == sent[r.request_id] for r in recs)
    df = store.finalized_records(plan.phase)
    parquet_ok = df is not None and len(df) == len(recs) and Counter(df.request_id) == counts
    by_arm: dict[str, Counter] = {}
    for r in recs:
        by_arm.setdefault(r.arm, Counter())[r.outcome] += 1
    return Accounting(len(plan.requests), len(recs), lost, dups, attempts_ok, parquet_ok, by_arm,
                      sum(1 for r in recs if r.attempt > 1))


def outcomes_text(c: Counter) -> str:
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
        expect(ok(got), f"{arm}: got {outcomes_text(got)}, expected {expected_text}")
    return (f"{a.describe()}, 0 lost, 0 dup; candidate: {outcomes_text(a.by_arm.get('candidate', Counter()))}; "
            f"control: {outcomes_text(a.by_arm.get('control', Counter()))}; resumed: {run.resent} re-sent")


def only(*classes: str) -> Callable[[Counter], bool]:
    return lambda c: sum(c.values()) > 0 and set(c) <= set(classes)


def all_success(c: Counter) -> bool:
    return only("success")(c)


@contextmanager
def servers(sb: Sandbox, candidate_mode: str, **opts: Any) -> Iterator[tuple[FaultServer, FaultServer]]:
    """A healthy control server and a candidate server in `candidate_mode`, both needing the key."""
    with FaultServer("healthy", api_key=sb.key) as control, FaultServer(candidate_mode, api_key=sb.key, backend="xgrammar", **opts) as cand:
        yield control, cand
    expect(port_closed(control.url) and port_closed(cand.url), "a fault server still accepts connections")


def journal_count(store: RunStore, phase: str, arm: str | None = None) -> int:
    """Records in the phase's journal so far (of one arm), read while the phase runs."""
    return sum(1 for r in store.journal(phase) if arm is None or r.arm == arm)


def file_tree(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, str]:
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
