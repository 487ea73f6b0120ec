"""Bad configs and schema suites of the hostile afternoon (issue 17): YAML that expands or nests
without bound, files too big to read, URLs that are not http(s), infinite numbers and booleans
for counts, phases that would not be honoured, `$ref`s that dangle, leave the document or loop,
files that are not regular files. Each goes through the real entry point (load_config,
parse_config, workload_items) and must be refused by a ConfigError naming the field or file,
quickly and with a short message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from guided_ab.config import load_config, parse_config
from guided_ab.selfcheck.bad_inputs import refused
from guided_ab.selfcheck.harness import SCHEMAS, Sandbox, expect


def _good(sb: Sandbox) -> dict:
    return sb.config_data("badconfig", "http://127.0.0.1:9", "http://127.0.0.1:9")


def _file(sb: Sandbox, name: str, text: str | bytes) -> Path:
    p = sb.inputs / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def _config_refused(sb: Sandbox, name: str, change: Callable[[dict], Any], *needles: str) -> str:
    d = _good(sb)
    change(d)
    p = _file(sb, f"{name}.yaml", yaml.safe_dump(d))
    return refused(lambda: load_config(p), str(p), *needles)


def _fast(fn: Callable[[], str], limit_s: float = 5.0) -> str:
    t0 = time.monotonic()
    out = fn()
    took = time.monotonic() - t0
    expect(took < limit_s, f"refused, but only after {took:.1f} s")
    expect(len(out) < 2000, f"a {len(out)}-character message")
    return f"{out} ({took:.2f} s)"


def bad_alias_bomb(sb: Sandbox) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["name: bomb", "arms:", "  - {name: a, role: control, backend: *l8}", "  - {name: b, role: candidate, backend: auto}"]
    p = _file(sb, "alias-bomb.yaml", "\n".join(lines) + "\n")
    return _fast(lambda: refused(lambda: load_config(p), str(p), "aliases"))


def bad_deep_yaml(sb: Sandbox) -> str:
    p = _file(sb, "deep.yaml", "name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return _fast(lambda: refused(lambda: load_config(p), str(p), "nested too deeply"))


def bad_huge_config(sb: Sandbox) -> str:
    p = sb.inputs / "huge.yaml"
    with open(p, "wb") as f:
        f.truncate(60 * 1024 * 1024)  # sparse: 60 MB that were never read
    try:
        return _fast(lambda: refused(lambda: load_config(p), str(p), "bytes"), 1.0)
    finally:
        p.unlink()


def _url(url: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        return _config_refused(sb, "url", lambda d: d["arms"][1].update(url=url), "arms.1.url", "http(s)")
    return scenario


def _workload_value(field: str, value: Any, *needles: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        d = _good(sb)
        d["workload"][field] = value
        return refused(lambda: parse_config(d, "selfcheck"), f"workload.{field}", *needles)
    return scenario


def _top_value(field: str, value: Any, *needles: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        return _config_refused(sb, f"top-{field}", lambda d: d.update({field: value}), field, *needles)
    return scenario


def _arms(change: Callable[[list], Any], *needles: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        return _config_refused(sb, "arms", lambda d: change(d["arms"]), *needles)
    return scenario


def bad_python_tag(sb: Sandbox) -> str:
    marker = sb.scratch / "python-tag-ran"
    p = _file(sb, "tag.yaml", f"name: !!python/object/apply:os.mkdir ['{marker}']\narms: []\n")
    msg = refused(lambda: load_config(p), str(p), "not valid YAML")
    expect(not marker.exists(), "the YAML tag ran code")
    return msg


def bad_empty_and_list(sb: Sandbox) -> str:
    empty = _file(sb, "empty.yaml", "")
    listed = _file(sb, "list.yaml", "- name: x\n")
    refused(lambda: load_config(empty), str(empty), "top level")
    return "empty file and a top-level list: " + refused(lambda: load_config(listed), str(listed), "top level")


def bad_not_utf8(sb: Sandbox) -> str:
    p = _file(sb, "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    return refused(lambda: load_config(p), str(p), "cannot read")


# -- schemas -------------------------------------------------------------------------------------
def _schema_refused(stem: str, schema: dict, *needles: str) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        from guided_ab.phases import workload_items

        suite = sb.write_suite(f"schema-{stem}", {**{k: SCHEMAS[k] for k in ("person",)}, stem: schema})
        d = _good(sb)
        d["workload"].update(suite=str(suite), size=2)
        cfg = parse_config(d, "selfcheck")
        return refused(lambda: workload_items(cfg), stem, *needles)
    return scenario


def _suite_file(make: Callable[[Path], None], *needles: str, limit_s: float = 2.0) -> Callable[[Sandbox], str]:
    def scenario(sb: Sandbox) -> str:
        from guided_ab.phases import workload_items

        suite = sb.write_suite(f"files-{make.__name__}", {"person": SCHEMAS["person"]})
        make(suite)
        d = _good(sb)
        d["workload"].update(suite=str(suite), size=1)
        cfg = parse_config(d, "selfcheck")
        try:
            return _fast(lambda: refused(lambda: workload_items(cfg), *needles), limit_s)
        finally:  # nothing left for the leak scan to block on (a FIFO) or read for nothing (60 MB of zeros)
            for p in suite.iterdir():
                if p.name != "person.json":
                    p.unlink()
    return scenario


def sparse_60mb(suite: Path) -> None:
    with open(suite / "big.json", "wb") as f:
        f.truncate(60 * 1024 * 1024)


def fifo(suite: Path) -> None:
    os.mkfifo(suite / "pipe.json")


def dev_zero(suite: Path) -> None:
    (suite / "zero.json").symlink_to("/dev/zero")


def latin1(suite: Path) -> None:
    (suite / "latin.json").write_bytes('{"title": "caf\xe9"}'.encode("latin-1"))


BAD_INPUTS: list[tuple[str, Callable[[Sandbox], str]]] = [
    ("yaml-alias-bomb", bad_alias_bomb),
    ("yaml-50000-deep", bad_deep_yaml),
    ("config-60mb-sparse", bad_huge_config),
    ("yaml-python-tag", bad_python_tag),
    ("config-empty-or-list", bad_empty_and_list),
    ("config-not-utf8", bad_not_utf8),
    ("url-ftp", _url("ftp://10.0.0.5/v1")),
    ("url-no-scheme", _url("localhost:8000")),
    ("url-no-host", _url("http://")),
    ("timeout-infinite", _workload_value("timeout_s", float("inf"), "finite")),
    ("temperature-nan", _workload_value("temperature", float("nan"), "finite")),
    ("size-boolean", _workload_value("size", True, "boolean")),
    ("timeout-boolean", _workload_value("timeout_s", True, "boolean")),
    ("start-timeout-infinite", _top_value("server_start_timeout_s", float("inf"), "finite")),
    ("phases-empty", _top_value("phases", [], "deploy")),
    ("phases-not-honoured", _top_value("phases", ["observe", "ab"], "deploy")),
    ("arms-duplicate-names", _arms(lambda a: a[1].update(name=a[0]["name"]), "unique")),
    ("arms-two-controls", _arms(lambda a: a[1].update(role="control"), "control")),
    ("arm-name-odd", _arms(lambda a: a[1].update(name="Cand idate"), "arms.1.name")),
    ("arm-unknown-target", _arms(lambda a: a[1].update(target="k8s"), "arms.1.target")),
    ("prompt-without-schema", _workload_value("prompt_template", "{prompt} as JSON", "{schema}")),
    ("ref-dangling", _schema_refused("dangling", {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}},
                                     "points to nothing")),
    ("ref-remote-https", _schema_refused("remote", {"$ref": "https://example.com/schema.json"}, "remote")),
    ("ref-other-file", _schema_refused("relative", {"properties": {"a": {"$ref": "defs.json#/a"}}}, "remote")),
    ("ref-loop-self", _schema_refused("selfloop", {"anyOf": [{"type": "string"}, {"$ref": "#"}]}, "loop")),
    ("ref-loop-via-defs", _schema_refused("defsloop", {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}},
                                                       "properties": {"x": {"$ref": "#/$defs/a"}}}, "loop")),
    ("regex-invalid", _schema_refused("badregex", {"type": "string", "pattern": "(unclosed"}, "regex")),
    ("schema-60mb-sparse", _suite_file(sparse_60mb, "big.json", "bytes")),
    ("schema-fifo", _suite_file(fifo, "pipe.json", "not a regular file")),
    ("schema-dev-zero", _suite_file(dev_zero, "zero.json", "not a regular file")),
    ("schema-not-utf8", _suite_file(latin1, "latin.json", "cannot read")),
]
