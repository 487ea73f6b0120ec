"""The workload: JSON schemas with prompts, from the built-in suite or a JSONSchemaBench-style directory,
or a team's own requests to replay (a .jsonl in the OpenAI Batch API input format, guided_ab/replay.py).

Built-in suite `functions` (guided_ab/suites/functions.json): function-signature argument schemas
like the seed's tool calls (a different schema on almost every request). A bench directory holds
one JSON Schema per file, optionally in sub-directories (subsets) such as
`../shared/jsonschemabench/Glaiveai2K`.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict

from guided_ab.config import ConfigError, Workload
from guided_ab.replay import answer_schema, is_replay_suite, read_requests
from guided_ab.schema_refs import check_refs

BUILTIN_SUITES = ("functions",)


class WorkItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_id: str
    subset: str
    prompt: str
    json_schema: dict[str, Any]
    # a request sent as it is (a replayed line, or a schema in tool mode): the chat completion body
    # without `model` and `stream`, which are set per arm and per request
    body: dict[str, Any] | None = None
    custom_id: str | None = None  # a replayed line's custom_id

    def render(self, template: str) -> str:
        schema_text = json.dumps(self.json_schema, separators=(",", ":"))
        return template.replace("{schema}", schema_text).replace("{prompt}", self.prompt)


WARMUP_ITEM = WorkItem(
    schema_id="warmup-ping",
    subset="warmup",
    prompt="Reply to a health check.",
    json_schema={
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
        "required": ["status"],
        "additionalProperties": False,
    },
)


def check_schema(schema: Any, where: str, max_bytes: int) -> dict[str, Any]:
    """Refuse what no backend should be sent: non-objects, invalid schemas, oversized schemas,
    and `$ref`s that dangle, point to another document or loop (guided_ab/schema_refs.py)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        size = len(json.dumps(schema))
    except RecursionError:  # thousands of levels: too deep for json itself, let alone a backend
        raise ConfigError(f"{where}: schema is nested too deeply to check") from None
    if size > max_bytes:
        raise ConfigError(
            f"{where}: schema is {size} bytes, over workload.max_schema_bytes={max_bytes}; "
            "raise the limit in the config or drop this schema"
        )
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as err:
        raise ConfigError(f"{where}: not a valid JSON schema: {err.message}") from None
    except RecursionError:
        raise ConfigError(f"{where}: schema is nested too deeply to check") from None
    check_refs(schema, where)
    return schema


def _prompt_for(schema: dict[str, Any], name: str) -> str:
    title = schema.get("title") or name
    desc = schema.get("description")
    text = f"Produce a realistic example of '{title}'"
    return f"{text}: {desc}" if isinstance(desc, str) and desc else text + "."


def builtin_suite(name: str = "functions") -> list[WorkItem]:
    if name not in BUILTIN_SUITES:
        raise ConfigError(f"workload.suite: unknown built-in suite {name!r}; use one of {BUILTIN_SUITES} or a directory")
    data = json.loads(resources.files("guided_ab.suites").joinpath(f"{name}.json").read_text())
    return [
        WorkItem(schema_id=e["id"], subset=name, prompt=e["prompt"], json_schema=e["schema"]) for e in data
    ]


# a schema file may be pretty-printed: this many times max_schema_bytes on disk before its
# compact JSON is measured; anything larger is refused without being read
FILE_BYTES_PER_SCHEMA_BYTE = 4


def _read_bounded(f: Path, max_bytes: int) -> str:
    """The text of a schema file, read only if it is a regular file of bounded size: a 60 MB file
    is refused by its size, a FIFO or /dev/zero named *.json never blocks or fills memory."""
    limit = FILE_BYTES_PER_SCHEMA_BYTE * max_bytes
    # opened without blocking (a FIFO would wait for a writer), then checked: the file checked is the file read
    with os.fdopen(os.open(f, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{f}: not a regular file; a schema must be a JSON file")
        if st.st_size > limit:
            raise ConfigError(f"{f}: {st.st_size} bytes, over {FILE_BYTES_PER_SCHEMA_BYTE} x workload.max_schema_bytes "
                              f"({limit}); raise the limit in the config or drop this schema")
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise ConfigError(f"{f}: over {limit} bytes; raise workload.max_schema_bytes or drop this schema")
    return data.decode("utf-8")


def bench_directory(path: Path, subsets: list[str], max_bytes: int) -> list[WorkItem]:
    """Every *.json schema in `path` (or in its `subsets` sub-directories), sorted by name."""
    if not path.is_dir():
        raise ConfigError(f"workload.suite: schema directory {path} does not exist or is not a directory")
    dirs = [(path / s, s) for s in subsets] if subsets else [(path, path.name)]
    items = []
    for d, subset in dirs:
        if not d.is_dir():
            raise ConfigError(f"workload.subsets: {d} is not a directory (subsets are sub-directories of {path})")
        try:
            files = sorted(d.glob("*.json"))
        except OSError as err:
            raise ConfigError(f"workload.suite: cannot read {d}: {err.strerror}") from None
        for f in files:
            try:
                schema = json.loads(_read_bounded(f, max_bytes))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ConfigError(f"{f}: cannot read the schema: {err}") from None
            except RecursionError:
                raise ConfigError(f"{f}: cannot read the schema: nested too deeply for a JSON parser") from None
            if isinstance(schema, bool):
                schema = {} if schema else {"not": {}}
            if not isinstance(schema, dict):
                raise ConfigError(f"{f}: a JSON schema must be an object, got {type(schema).__name__}")
            items.append(WorkItem(schema_id=f"{subset}/{f.stem}", subset=subset, prompt="", json_schema=schema))
    if not items:
        raise ConfigError(f"workload.suite: no *.json schema files found in {path} {subsets or ''}")
    return items


def load_workload(wl: Workload, base_dir: Path | None = None) -> list[WorkItem]:
    """The schemas of a workload, sampled (seeded) to observe_size + size and checked.

    The first `observe_size` items are for the observe phase, the rest for A/B: disjoint, so the
    A/B phase's first-request-per-schema latency is never warmed by observe.
    """
    pool = suite_pool(wl, base_dir)
    need = wl.size + wl.observe_size
    if need > len(pool):
        raise ConfigError(
            f"workload.size: {wl.size} + observe_size {wl.observe_size} = {need} schemas needed but "
            f"suite {wl.suite!r} has {len(pool)}; lower the sizes or use a larger suite"
        )
    picked = random.Random(wl.seed).sample(pool, need)
    return [_checked(it, wl) for it in picked]


def suite_pool(wl: Workload, base_dir: Path | None = None) -> list[WorkItem]:
    """Every schema of the workload's suite (unchecked, in the suite's order); a replay file's
    requests (checked as they are read: a bad line names its file and line)."""
    if wl.suite in BUILTIN_SUITES:
        return builtin_suite(wl.suite)
    p = Path(wl.suite)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if is_replay_suite(wl.suite):
        return replay_items(p, wl)
    return bench_directory(p, wl.subsets, wl.max_schema_bytes)


def replay_items(path: Path, wl: Workload) -> list[WorkItem]:
    """The requests of a Batch API input file as work items: schema_id = custom_id."""
    return [
        WorkItem(schema_id=r["custom_id"], subset=path.stem, prompt="", json_schema=answer_schema(r["body"]),
                 body=r["body"], custom_id=r["custom_id"])
        for r in read_requests(path, wl)
    ]


def tool_body(it: WorkItem, wl: Workload) -> dict[str, Any]:
    """A schema of the suite as the seed's tool call: one function with the schema as its
    parameters, a call required (`workload.mode: tools`)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", it.schema_id)[:64]
    fn: dict[str, Any] = {"name": name, "parameters": it.json_schema}
    if isinstance(it.json_schema.get("description"), str):
        fn["description"] = it.json_schema["description"]
    return {
        "messages": [{"role": "user", "content": f"{it.prompt}\nCall the function `{name}` with realistic arguments."}],
        "temperature": wl.temperature,
        "max_tokens": wl.max_tokens,
        "tools": [{"type": "function", "function": fn}],
        "tool_choice": "required",
    }


def _checked(it: WorkItem, wl: Workload) -> WorkItem:
    if it.body is not None:  # a replayed request: checked when its file was read
        return it
    schema = check_schema(it.json_schema, it.schema_id, wl.max_schema_bytes)
    it = it.model_copy(update={"json_schema": schema, "prompt": it.prompt or _prompt_for(schema, it.schema_id)})
    if wl.mode == "tools":
        it = it.model_copy(update={"body": tool_body(it, wl)})
    return it


def more_items(wl: Workload, exclude: set[str], n: int, base_dir: Path | None = None) -> list[WorkItem]:
    """Up to `n` schemas of the suite beyond the workload's own, none in `exclude`, in a seeded
    order (the same on every call): what a sequential A/B sends once the workload's schemas are used."""
    pool = suite_pool(wl, base_dir)
    random.Random(f"{wl.seed}-more").shuffle(pool)
    return [_checked(it, wl) for it in [it for it in pool if it.schema_id not in exclude][:n]]
