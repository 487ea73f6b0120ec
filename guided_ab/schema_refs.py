"""Every `$ref` of a workload schema resolved when the workload loads, before anything is sent.

A `$ref` the validator cannot follow used to surface only when the first answer was validated
(PointerToNowhere from jsonschema's resolver), which crashed the phase after its requests were
sent, on every resume: the run could never finish. So refs are settled up front, with the
`referencing` library that jsonschema resolves them with:

- a `$ref` (or `$dynamicRef`) into the schema itself, or into a resource embedded in it with
  `$id`, must point at something: a dangling one is a ConfigError naming the schema and where;
- the remote-reference policy: **refused**. A `$ref` to another document (`https://...`,
  `other.json`) is a ConfigError: guided-ab never fetches schemas, because the validator, the
  dry run and each server under test would each have to fetch the same document the same way
  (and a fetch at validation time is a network call per answer). Copy the referenced schema
  under `$defs` and point there. `REGISTRY` is the registry every validator uses: it refuses
  to retrieve anything;
- a loop is refused: a cycle of `$ref`s and in-place applicators (`allOf`, `anyOf`, `oneOf`,
  `not`, `if`/`then`/`else`, `dependentSchemas`) that returns to a schema without descending into
  the answer (a property or an item) would validate forever. Recursion through a property or
  an item (a tree) is fine: each step consumes a level of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from referencing import Registry, Resource, Specification
from referencing.exceptions import InvalidAnchor, NoSuchAnchor, NoSuchResource, PointerToNowhere, Unresolvable
from referencing.jsonschema import DRAFT202012, specification_with

from guided_ab.errors import ConfigError

REF_KEYWORDS = ("$ref", "$dynamicRef")
# keywords whose subschemas apply to the same instance as the schema holding them
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")


def _refuse_remote(uri: str) -> Resource:
    raise NoSuchResource(uri)


REGISTRY: Registry = Registry(retrieve=_refuse_remote)  # type: ignore[call-arg]  # (attrs: mypy does not see its __init__)


def specification(schema: dict[str, Any]) -> Specification:
    """The schema's draft (its `$schema`), Draft 2020-12 when it names none or an unknown one."""
    return specification_with(schema.get("$schema", ""), default=DRAFT202012)


def _pointers(root: Any) -> dict[int, str]:
    """JSON pointer of every object and array in the schema, by identity (for the messages)."""
    out: dict[int, str] = {}
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, ptr = stack.pop()
        if isinstance(node, dict):
            out[id(node)] = ptr or "/"
            stack += [(v, f"{ptr}/{str(k).replace('~', '~0').replace('/', '~1')}") for k, v in node.items()]
        elif isinstance(node, list):
            out[id(node)] = ptr or "/"
            stack += [(v, f"{ptr}/{i}") for i, v in enumerate(node)]
    return out


def _subschemas(node: dict, resolver: Any, spec: Specification) -> Iterator[tuple[dict, Any]]:
    """(subschema, its resolver) for every subschema directly under `node` (the library's keyword table)."""
    for sub in spec.create_resource(node).subresources():
        if isinstance(sub.contents, dict):
            yield sub.contents, resolver.in_subresource(spec.create_resource(sub.contents))


def _in_place(node: dict) -> Iterator[dict]:
    for kw in _IN_PLACE_LISTS:
        for sub in node.get(kw) or ():
            if isinstance(sub, dict):
                yield sub
    for kw in _IN_PLACE_ONE:
        if isinstance(node.get(kw), dict):
            yield node[kw]
    deps = node.get("dependentSchemas")
    if isinstance(deps, dict):
        yield from (s for s in deps.values() if isinstance(s, dict))


def check_refs(schema: dict[str, Any], where: str) -> None:
    """Raise ConfigError for a dangling or remote `$ref`, or a loop (see the module's doc)."""
    spec = specification(schema)
    root = spec.create_resource(schema)
    pointers = _pointers(schema)
    resolver = REGISTRY.resolver_with_root(root)
    # 1. every ref, wherever it is, resolves inside the schema; remember each ref's target
    targets: dict[int, list[tuple[str, dict]]] = {}
    nodes: list[dict] = []
    stack: list[tuple[dict, Any]] = [(schema, resolver)]
    while stack:
        node, res = stack.pop()
        nodes.append(node)
        for kw in REF_KEYWORDS:
            ref = node.get(kw)
            if not isinstance(ref, str):
                continue
            at = pointers.get(id(node), "?")
            try:
                found = res.lookup(ref)
            except (PointerToNowhere, NoSuchAnchor, InvalidAnchor):
                raise ConfigError(f"{where}: {kw} {ref!r} at {at} points to nothing in the schema") from None
            except Unresolvable:  # another document: never fetched
                raise ConfigError(
                    f"{where}: {kw} {ref!r} at {at} is a remote or unknown reference, refused: guided-ab never "
                    "fetches schemas; copy the referenced schema under $defs and point to it there") from None
            if isinstance(found.contents, dict):
                targets.setdefault(id(node), []).append((ref, found.contents))
        stack += list(_subschemas(node, res, spec))
    # 2. no cycle through refs and in-place applicators, from any subschema (iterative DFS:
    # schemas may be deep)
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    for start in nodes:
        if id(start) not in state:
            _no_loop(start, targets, pointers, state, where)


def _no_loop(start: dict, targets: dict[int, list[tuple[str, dict]]], pointers: dict[int, str], state: dict[int, int],
             where: str) -> None:
    path: list[str] = []
    todo: list[tuple[dict, Iterator[tuple[str, dict]] | None]] = [(start, None)]
    while todo:
        node, edges = todo[-1]
        if edges is None:
            state[id(node)] = 1
            out = [(f"{pointers.get(id(node), '?')} {ref!r}", t) for ref, t in targets.get(id(node), [])]
            out += [(pointers.get(id(s), "?"), s) for s in _in_place(node)]
            edges = iter(out)
            todo[-1] = (node, edges)
        step = next(edges, None)
        if step is None:
            state[id(node)] = 2
            todo.pop()
            if path:
                path.pop()
            continue
        label, nxt = step
        if state.get(id(nxt)) == 1:
            chain = " -> ".join([*path, label][-6:])
            raise ConfigError(f"{where}: $ref loop ({chain}) comes back to {pointers.get(id(nxt), '?')} without "
                              "descending into the answer: no answer could ever be validated against it")
        if state.get(id(nxt)) is None:
            path.append(label)
            todo.append((nxt, None))
