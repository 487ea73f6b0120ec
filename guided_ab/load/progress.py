"""Progress bars on the terminal for the long phases (server start, requests).

Shown only when stderr is a terminal (and GUIDED_AB_PROGRESS is not 0/false/off): under a
Prefect worker, in CI or piped, nothing is drawn and the Prefect progress artifact and logs are
the progress. While a bar is live, log handlers that print through a rich Console (Prefect's
console handler does) print above the bar instead of tearing it.

    with console_progress.bar("ab: requests", total=64) as bar:
        bar.update(done, total, outcomes)       # thread-safe; outcomes: {"success": 60, ...}
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

OUTCOME_STYLE = {"success": "green", "truncated": "yellow", "schema_violation": "red", "invalid_json": "magenta",
                 "rejected": "red", "server_error": "bold red", "timeout": "bright_black", "connection_error": "red",
                 "validation_timeout": "yellow", "validation_error": "yellow", "no_tool_call": "red", "unknown_tool": "red",
                 "context_overflow": "blue", "invalid_request": "blue"}  # blue: the workload's problems, not a backend's


def enabled() -> bool:
    if os.environ.get("GUIDED_AB_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def describe_outcomes(outcomes: Mapping[str, int]) -> str:
    return "  ".join(f"[{OUTCOME_STYLE.get(k, 'white')}]{k} {v}[/]" for k, v in sorted(outcomes.items()) if v)


class Bar:
    """One progress line; a no-op when the terminal shows none."""

    def __init__(self, progress: Any = None, task: Any = None):
        self._p, self._t = progress, task

    def update(self, done: int, total: int | None = None, outcomes: Mapping[str, int] | None = None,
               description: str | None = None) -> None:
        if self._p is None:
            return
        kw: dict[str, Any] = {"completed": done}
        if total:
            kw["total"] = total
        if outcomes is not None:
            kw["outcomes"] = describe_outcomes(outcomes)
        if description is not None:
            kw["description"] = description
        self._p.update(self._t, **kw)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=n, **({"description": description} if description else {}))


def _rich_handlers() -> list[Any]:
    """Log handlers that print through a rich Console (a `console` attribute, e.g. Prefect's)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    seen, out = set(), []
    for lg in loggers:
        for h in lg.handlers:
            if id(h) not in seen and hasattr(h, "console") and hasattr(h.console, "print"):
                seen.add(id(h))
                out.append(h)
    return out


@contextmanager
def bar(description: str, total: int | None = None, *, show: bool | None = None) -> Iterator[Bar]:
    """A live progress line for one phase (total None: a spinner with elapsed time)."""
    if not (enabled() if show is None else show):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns: list[Any] = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), TaskProgressColumn()]
    columns += [TimeElapsedColumn()]
    if total is not None:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    columns += [TextColumn("{task.fields[outcomes]}")]
    progress = Progress(*columns, console=console, transient=False, refresh_per_second=4)
    handlers = _rich_handlers()
    saved = [(h, h.console) for h in handlers]
    task = progress.add_task(description, total=total, outcomes="")
    progress.start()
    for h in handlers:
        h.console = console  # log lines print above the live bar
    try:
        yield Bar(progress, task)
    finally:
        for h, c in saved:
            h.console = c
        progress.stop()
