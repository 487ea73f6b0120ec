"""The built-in `functions` suite: well-formed entries, valid schemas, the feature mix, and sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from guided_ab.config import Workload
from guided_ab.workload import builtin_suite, load_workload

SUITE_PATH = Path(__file__).resolve().parents[1] / "guided_ab" / "suites" / "functions.json"


@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return json.loads(SUITE_PATH.read_text(encoding="utf-8"))


def _ids(suite: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in suite]


def _uses(entry: dict[str, Any], keyword: str) -> bool:
    """Whether the schema text contains `keyword` as a JSON key."""
    return f'"{keyword}":' in json.dumps(entry["schema"], separators=(",", ":"))


def _objects(node: Any):
    """Every sub-schema that is (or declares properties like) an object schema."""
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def test_suite_loads_as_a_list_of_entries(suite):
    assert isinstance(suite, list)
    for e in suite:
        assert set(e) == {"id", "prompt", "features", "schema"}, e.get("id")
        assert isinstance(e["id"], str) and e["id"]
        assert isinstance(e["prompt"], str) and e["prompt"].strip(), e["id"]
        assert isinstance(e["features"], list) and e["features"], e["id"]
        assert all(isinstance(f, str) for f in e["features"]), e["id"]
        assert isinstance(e["schema"], dict), e["id"]


def test_suite_has_at_least_50_entries(suite):
    assert len(suite) >= 50


def test_ids_are_unique_kebab_case(suite):
    ids = _ids(suite)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for i in ids:
        assert i == i.lower() and " " not in i and "_" not in i, i


@pytest.mark.parametrize("index", range(len(json.loads(SUITE_PATH.read_text(encoding="utf-8")))))
def test_schema_is_valid_draft_2020_12(suite, index):
    Draft202012Validator.check_schema(suite[index]["schema"])


def test_every_schema_is_an_object_schema_with_required(suite):
    for e in suite:
        s = e["schema"]
        assert s.get("type") == "object", e["id"]
        assert isinstance(s.get("properties"), dict) and s["properties"], e["id"]
        assert isinstance(s.get("required"), list) and s["required"], e["id"]
        assert set(s["required"]) <= set(s["properties"]), e["id"]
        for sub in _objects(s):
            assert sub.get("type") == "object", (e["id"], sub)
            assert isinstance(sub.get("required"), list), (e["id"], sub)


def test_at_least_8_use_multipleof_or_uniqueitems(suite):
    hits = [e["id"] for e in suite if _uses(e, "multipleOf") or _uses(e, "uniqueItems")]
    assert len(hits) >= 8, hits


def test_at_least_5_use_format(suite):
    hits = [e["id"] for e in suite if _uses(e, "format")]
    assert len(hits) >= 5, hits


def test_at_least_5_use_enum(suite):
    hits = [e["id"] for e in suite if _uses(e, "enum")]
    assert len(hits) >= 5, hits


def test_builtin_suite_returns_the_same_ids(suite):
    items = builtin_suite("functions")
    assert [it.schema_id for it in items] == _ids(suite)
    by_id = {e["id"]: e for e in suite}
    for it in items:
        assert it.subset == "functions"
        assert it.prompt == by_id[it.schema_id]["prompt"]
        assert it.json_schema == by_id[it.schema_id]["schema"]


def test_load_workload_samples_distinct_items_deterministically():
    wl = Workload(size=32, observe_size=8, seed=1)
    first = load_workload(wl)
    assert len(first) == 40
    assert len({it.schema_id for it in first}) == 40

    again = load_workload(Workload(size=32, observe_size=8, seed=1))
    assert [it.schema_id for it in again] == [it.schema_id for it in first]

    other = load_workload(Workload(size=32, observe_size=8, seed=2))
    assert len(other) == 40
    assert [it.schema_id for it in other] != [it.schema_id for it in first]
