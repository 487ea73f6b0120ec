"""Every selfcheck scenario, by kind, in the order `guided-ab selfcheck` runs them: the first
faults and bad inputs (faults.py, bad_inputs.py) and those of the hostile afternoon of issue 17
(hostile.py, bad_configs.py, bad_stores.py). One list per kind, so run.py and the tests
(tests/test_faults.py) walk the same scenarios."""

from __future__ import annotations

from collections.abc import Callable

from guided_ab.selfcheck import bad_configs, bad_inputs, bad_stores, faults, hostile
from guided_ab.selfcheck.harness import Sandbox

Scenario = tuple[str, Callable[[Sandbox], str]]

FAULTS: list[Scenario] = [*faults.FAULTS, *hostile.FAULTS]
SECURITY: list[Scenario] = [*faults.SECURITY, *hostile.SECURITY]
BAD_INPUTS: list[Scenario] = [*bad_inputs.BAD_INPUTS, *bad_configs.BAD_INPUTS, *bad_stores.BAD_INPUTS]
