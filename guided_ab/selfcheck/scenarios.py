"""The selfcheck's scenarios, by theme, in one place to import them from:

    harness.py     what every scenario shares: the sandbox, accounting of a phase against its
                   plan, one A/B phase through the real pipeline, the checks of a fault scenario
    faults.py      FAULTS and SECURITY: loopback servers failing, processes SIGKILLed, a torn
                   journal line, a wrong API key
    hostile.py     more of both (issue 17): echoed keys, regex bait, odd statuses, redirects,
                   huge headers and answers, two writers, SIGINT, reused pids
    bad_inputs.py  BAD_INPUTS: configs, suites, schemas, stores and run ids that must be refused
    bad_configs.py, bad_stores.py  more of them (issue 17): YAML bombs, URLs, $refs, damaged run dirs
    catalog.py     all of them, one list per kind
    run.py         the command: run_scenario, the leak check, `selfcheck()` (what
                   `guided-ab selfcheck` runs)
"""

from __future__ import annotations

from guided_ab.selfcheck.catalog import BAD_INPUTS, FAULTS, SECURITY
from guided_ab.selfcheck.faults import fault_reset
from guided_ab.selfcheck.harness import KEY_ENV, SCHEMAS, Sandbox, expect
from guided_ab.selfcheck.run import leaked_files, run_scenario, selfcheck

__all__ = [
    "BAD_INPUTS", "FAULTS", "KEY_ENV", "SCHEMAS", "SECURITY", "Sandbox", "expect", "fault_reset", "leaked_files",
    "run_scenario", "selfcheck",
]
