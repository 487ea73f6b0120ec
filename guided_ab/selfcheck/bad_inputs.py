"""The bad-input scenarios: every bad input goes through the real entry points (load_config,
parse_config, workload_items, RunStore) and must end in a ConfigError naming the field or file,
with nothing written outside the store directory and nothing lost from a store that already
holds records. A schema too large, too deep or too slow to compile is refused or contained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from guided_ab.config import ConfigError, load_config, parse_config
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.selfcheck.harness import (
    SCHEMAS,
    Failed,
    Sandbox,
    all_success,
    check_run,
    expect,
    file_tree,
    only,
    run_phase,
)
from guided_ab.store import RunStore


def refused(fn: Callable[[], object], *needles: str, error: type[Exception] = ConfigError) -> str:
    """fn must raise ConfigError (or `error`) whose message names every needle; returns the first line."""
    try:
        fn()
    except error as err:
        msg = str(err)
        missing = [n for n in needles if n not in msg]
        expect(not missing, f"the error does not name {missing}: {msg[:300]}")
        text = " | ".join(x.strip() for x in msg.splitlines() if x.strip())
        return text if len(text) <= 150 else text[:147] + "..."
    except Exception as err:  # noqa: BLE001 - anything but a ConfigError is a failed scenario
        raise Failed(f"{type(err).__name__} instead of a clear {error.__name__}: {str(err)[:200]}") from None
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
        refused(partial(load_config, p), str(p), f"workload.{k}")
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
    before = file_tree(sb.store)
    bad = ["../x", "a/b", "..", "/tmp/guided-ab-escape", "x/../../y", "existing-run/../../z", "a\x00b"]
    for rid in bad:
        refused(partial(RunStore.create, cfg, rid), "run id")
        refused(partial(RunStore.open, sb.store, rid), "run id")
    refused(lambda: RunStore.open(sb.store, ""), "run id")
    expect(file_tree(sb.store) == before, "the store changed")
    expect(len(existing.journal("ab")) == 3, "the existing run lost records")
    expect(not (sb.store.parent / "x").exists() and not Path("/tmp/guided-ab-escape").exists(), "something was written outside")
    phases.teardown(existing, log=sb.log)  # nothing to stop: a no-op that must not fail
    return f"{len(bad)} run ids refused (create and open); existing run keeps its 3 records; store unchanged"


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
