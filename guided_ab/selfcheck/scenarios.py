"""The selfcheck's scenarios, by theme, in one place to import them from:

    harness.py     what every scenario shares: the sandbox, accounting of a phase against its
                   plan, one A/B phase through the real pipeline, the checks of a fault scenario
    faults.py      FAULTS and SECURITY: loopback servers failing, processes SIGKILLed, a torn
                   journal line, a wrong API key
    bad_inputs.py  BAD_INPUTS: configs, suites, schemas, stores and run ids that must be refused
    run.py         the command: run_scenario, the leak check, `selfcheck()` (what
                   `guided-ab selfcheck` runs)
"""

from __future__ import annotations

from guided_ab.selfcheck.bad_inputs import BAD_INPUTS
from guided_ab.selfcheck.faults import FAULTS, SECURITY, fault_reset
from guided_ab.selfcheck.harness import KEY_ENV, SCHEMAS, Sandbox, expect
from guided_ab.selfcheck.run import leaked_files, run_scenario, selfcheck

__all__ = [
    "BAD_INPUTS", "FAULTS", "KEY_ENV", "SCHEMAS", "SECURITY", "Sandbox", "expect", "fault_reset", "leaked_files",
    "run_scenario", "selfcheck",
]
