#!/usr/bin/env bash
# The whole check, in the order a reviewer would read it: the house (lint, types, import
# contracts from pyproject.toml), then the test suite. Extra arguments go to pytest.
# Any failure — including pytest's exit 5, "no tests collected" — fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[check] ruff";        .venv/bin/ruff check .
echo "[check] mypy";        .venv/bin/mypy
echo "[check] lint-imports"; .venv/bin/lint-imports --no-cache
echo "[check] pytest";      exec .venv/bin/python -m pytest "$@"
