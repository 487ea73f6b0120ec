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
logs, and Prefect's database and result storage, decoded: guided_ab/selfcheck/leaks.py) is
searched for the API key.

The last line is `scenarios=<n> survived=<n> bad_inputs=<n> lost=<n> duplicates=<n> leaked=<n>`;
the exit status is 0 only when every scenario held and lost = duplicates = leaked = 0.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from guided_ab.selfcheck.catalog import BAD_INPUTS, FAULTS, SECURITY
from guided_ab.selfcheck.faults import fault_flow_killed, fault_vllm_killed
from guided_ab.selfcheck.harness import KEY_ENV, Failed, Result, Sandbox, file_tree
from guided_ab.selfcheck.leaks import leaked_files


# -- the command ---------------------------------------------------------------------------------
def run_scenario(sb: Sandbox, name: str, kind: str, fn: Callable[[Sandbox], str]) -> Result:
    allowed = (sb.store, sb.logs, sb.inputs, sb.scratch)
    outside_before = file_tree(sb.root, exclude=allowed)
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
    outside_after = file_tree(sb.root, exclude=allowed)
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
