"""Validate one answer against its schema, in bounded time, off the event loop.

Why each part:
- **Bounded regexes.** A schema's `pattern` (or `patternProperties`) such as `^(a|a)+$` makes a
  backtracking engine take exponential time on a short answer, and Python's `re` holds the GIL
  while it does: a worker thread alone would still freeze the event loop, and with it every
  other request's clock. jsonschema matches patterns with `re.search` in its keyword code
  (`jsonschema._keywords`, `jsonschema._utils`), and has no hook for another engine, so those two
  modules see `BOUNDED_RE` as their `re`: while a validation runs here, `search` uses the
  `regex` package (its `timeout`, and `concurrent=True`, which releases the GIL while matching);
  anywhere else (schema checks at load time, Prefect's own parameter validation) it is plain `re`.
  `regex` also does not backtrack on the common `^(a+)+$` shape at all.
- **A time bound for the whole validation** (`validate`'s deadline for every regex, and the
  caller's `asyncio.wait_for` around the worker thread for anything else): past it the answer
  is `validation_timeout`, its own outcome class, never a stalled phase.
- **Any exception of the validator is an outcome** (`validation_error`), never a crash: a phase
  that crashed after sending would re-send and crash again on every resume.
- `$ref`s resolve through schema_refs.REGISTRY: nothing is ever fetched (the workload refused
  remote and dangling refs when it loaded; this is the second line).
"""

from __future__ import annotations

import json
import re
import threading
import time
from functools import lru_cache
from typing import Any

import jsonschema._keywords
import jsonschema._utils
import regex
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from guided_ab.records import Outcome
from guided_ab.schema_refs import REGISTRY

_FORMATS = Draft202012Validator.FORMAT_CHECKER
_deadline = threading.local()  # the monotonic time this thread's validation must end by


class ValidationTimedOut(Exception):
    """The validation ran past its time bound."""


class _BoundedRe:
    """The `re` that jsonschema's keyword code sees (see the module's doc)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    def search(self, pattern: str, string: str, flags: int = 0) -> Any:
        at = getattr(_deadline, "at", None)
        if at is None:
            return re.search(pattern, string, flags)
        left = at - time.monotonic()
        if left <= 0:
            raise ValidationTimedOut(f"pattern {pattern[:80]!r}")
        try:
            return regex.search(pattern, string, flags, timeout=left, concurrent=True)
        except TimeoutError:
            raise ValidationTimedOut(f"pattern {pattern[:80]!r}") from None


BOUNDED_RE = _BoundedRe()
for _module in (jsonschema._keywords, jsonschema._utils):
    if getattr(_module, "re", None) is re:  # tests/test_reliability2.py fails if jsonschema stops matching this way
        _module.re = BOUNDED_RE


@lru_cache(maxsize=4096)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), format_checker=_FORMATS, registry=REGISTRY)


def schema_key(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True)


def validate(instance: Any, schema: dict | str, timeout_s: float) -> tuple[Outcome, str | None]:
    """(outcome, error) of validating `instance`: success, schema_violation, validation_timeout
    or validation_error. `schema` may be given as its schema_key (cheaper when cached)."""
    _deadline.at = time.monotonic() + timeout_s
    try:
        v = _validator(schema if isinstance(schema, str) else schema_key(schema))
        err = best_match(v.iter_errors(instance))
    except ValidationTimedOut as exc:
        return "validation_timeout", f"validation took longer than {timeout_s:g} s ({exc})"
    except RecursionError:
        return "schema_violation", "schema too deeply nested to validate"
    except Exception as exc:  # noqa: BLE001 - any failure of the validator is an outcome, never a crash
        return "validation_error", f"the validator failed: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        _deadline.at = None
    if err is None:
        return "success", None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return "schema_violation", f"at {where}: {err.message[:300]}"
