"""A small JSON value that validates against a JSON schema: the answer the fault server's
healthy mode sends (guided_ab.selfcheck.fault_server). Stdlib only, like the server, which runs
as a subprocess that must start fast.
"""

from __future__ import annotations

import math
from typing import Any

_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z", "date": "2025-01-01", "time": "00:00:00Z", "email": "a@example.com",
    "idn-email": "a@example.com", "uri": "https://example.com/", "iri": "https://example.com/",
    "uri-reference": "https://example.com/", "url": "https://example.com/", "hostname": "example.com",
    "idn-hostname": "example.com", "ipv4": "127.0.0.1", "ipv6": "::1",
    "uuid": "00000000-0000-4000-8000-000000000000", "duration": "P1D", "regex": "a",
}


def _resolve(ref: str, root: Any) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node


def _number(schema: dict, integer: bool) -> int | float:
    lo = schema.get("minimum")
    xlo = schema.get("exclusiveMinimum")
    hi = schema.get("maximum")
    xhi = schema.get("exclusiveMaximum")
    v: float = 0
    if isinstance(lo, (int, float)) and not isinstance(lo, bool):
        v = max(v, lo) if not (isinstance(hi, (int, float)) and hi < 0) else lo
    if isinstance(xlo, (int, float)) and not isinstance(xlo, bool) and v <= xlo:
        v = math.floor(xlo) + 1 if integer else xlo + 0.5
    if isinstance(hi, (int, float)) and not isinstance(hi, bool) and v > hi:
        v = hi
    if isinstance(xhi, (int, float)) and not isinstance(xhi, bool) and v >= xhi:
        v = math.ceil(xhi) - 1 if integer else xhi - 0.5
    m = schema.get("multipleOf")
    if isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0:
        v = math.ceil(v / m) * m
    if integer:
        return int(math.ceil(v))
    return float(v)


def minimal_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small JSON value meant to validate against `schema`.

    Handles types, enum/const, required properties, min sizes, numeric bounds, formats, local
    $refs and the first branch of anyOf/oneOf. `pattern` is not honoured (a string of "a"s is
    sent), so a schema with a pattern may get a schema_violation from the healthy mode.
    """
    root = schema if root is None else root
    if depth > 64 or schema is True or not isinstance(schema, dict):
        return {} if schema is not False else None
    if "$ref" in schema and isinstance(schema["$ref"], str):
        merged = {**_resolve(schema["$ref"], root), **{k: v for k, v in schema.items() if k != "$ref"}}
        return minimal_instance(merged, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged = dict(schema)
        del merged["allOf"]
        for sub in schema["allOf"]:
            if isinstance(sub, dict):
                for k, v in sub.items():
                    if k == "properties" and isinstance(v, dict):
                        merged["properties"] = {**merged.get("properties", {}), **v}
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = [*merged.get("required", []), *v]
                    else:
                        merged.setdefault(k, v)
        return minimal_instance(merged, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            rest = {k: v for k, v in schema.items() if k != key}
            branch = schema[key][0]
            return minimal_instance({**rest, **branch} if isinstance(branch, dict) else branch, root, depth + 1)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if t is None:
        if "properties" in schema or "required" in schema:
            t = "object"
        elif "items" in schema or "prefixItems" in schema:
            t = "array"
        else:
            return {}
    if t == "object":
        props: dict = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        obj = {}
        for name in required:
            obj[name] = minimal_instance(props.get(name, {}), root, depth + 1)
        want = schema.get("minProperties", 0)
        for name, sub in props.items():
            if not isinstance(want, int) or len(obj) >= want:
                break
            obj.setdefault(name, minimal_instance(sub, root, depth + 1))
        return obj
    if t == "array":
        prefix: list = schema["prefixItems"] if isinstance(schema.get("prefixItems"), list) else []
        out = [minimal_instance(s, root, depth + 1) for s in prefix]
        n = schema.get("minItems", 0)
        n = n if isinstance(n, int) else 0
        items = schema.get("items", {})
        i = 0
        while len(out) < n:
            item = minimal_instance(items, root, depth + 1)
            if schema.get("uniqueItems") and isinstance(item, (int, float)) and not isinstance(item, bool):
                item = item + i
            elif schema.get("uniqueItems") and isinstance(item, str):
                item = item + "a" * i
            out.append(item)
            i += 1
        return out
    if t == "string":
        fmt = schema.get("format")
        if fmt in _FORMATS:
            return _FORMATS[fmt]
        lo = schema.get("minLength", 1)
        lo = lo if isinstance(lo, int) and lo >= 0 else 1
        hi = schema.get("maxLength")
        n = max(lo, 1)
        if isinstance(hi, int) and hi < n:
            n = hi
        return "a" * n
    if t == "integer":
        return _number(schema, True)
    if t == "number":
        return _number(schema, False)
    if t == "boolean":
        return True
    return None
