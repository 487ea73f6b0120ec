"""The workload: JSON schemas with prompts, from the built-in suite or a JSONSchemaBench-style directory.

Built-in suite `functions` (guided_ab/suites/functions.json): function-signature argument schemas
like the seed's tool calls (a different schema on almost every request). A bench directory holds
one JSON Schema per file, optionally in sub-directories (subsets) such as
`../shared/jsonschemabench/Glaiveai2K`.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict

from guided_ab.config import ConfigError, Workload

BUILTIN_SUITES = ("functions",)


class WorkItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_id: str
    subset: str
    prompt: str
    json_schema: dict[str, Any]

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
    """Refuse what no backend should be sent: non-objects, invalid schemas, oversized schemas."""
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
                schema = json.loads(f.read_text(encoding="utf-8"))
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
    if wl.suite in BUILTIN_SUITES:
        pool = builtin_suite(wl.suite)
    else:
        p = Path(wl.suite)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        pool = bench_directory(p, wl.subsets, wl.max_schema_bytes)
    need = wl.size + wl.observe_size
    if need > len(pool):
        raise ConfigError(
            f"workload.size: {wl.size} + observe_size {wl.observe_size} = {need} schemas needed but "
            f"suite {wl.suite!r} has {len(pool)}; lower the sizes or use a larger suite"
        )
    picked = random.Random(wl.seed).sample(pool, need)
    out = []
    for it in picked:
        schema = check_schema(it.json_schema, it.schema_id, wl.max_schema_bytes)
        out.append(it.model_copy(update={"json_schema": schema, "prompt": it.prompt or _prompt_for(schema, it.schema_id)}))
    return out
