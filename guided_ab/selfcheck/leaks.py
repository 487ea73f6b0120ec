"""The key-leak scan: does any file a run (or Prefect, for it) wrote hold an API key?

Searched, per file: its raw bytes; a parquet file's decoded contents; and anything encoded in
it the way Prefect stores what it keeps: its result storage (PREFECT_LOCAL_STORAGE_PATH, by
default under PREFECT_HOME) writes pickled or JSON results base64-encoded, optionally
lzma/gzip/bz2/zlib-compressed, inside a JSON record, where a raw search never sees a key. So
every base64 run (in the raw bytes and in every JSON string) is decoded, and decompressed when
it is compressed, and searched too.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

_B64_RUN = re.compile(rb"[A-Za-z0-9+/=\r\n]{40,}")
_MAX_DECODE = 64 * 1024 * 1024  # a larger file is searched raw only


def prefect_dirs() -> list[Path]:
    """Where this process's Prefect keeps its database and results (those that exist)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    storage = Path(os.environ.get("PREFECT_LOCAL_STORAGE_PATH") or home / "storage")
    return [d for d in dict.fromkeys((home, storage)) if d.is_dir()]


def _decompressed(blob: bytes) -> Iterator[bytes]:
    yield blob
    for fn in (lzma.decompress, gzip.decompress, bz2.decompress, zlib.decompress):
        try:
            yield fn(blob)
        except Exception:  # noqa: BLE001 - not this compression
            continue


def _base64_views(data: bytes) -> Iterator[bytes]:
    for m in _B64_RUN.finditer(data):
        try:
            blob = base64.b64decode(re.sub(rb"\s", b"", m.group()), validate=True)
        except (binascii.Error, ValueError):
            continue
        yield from _decompressed(blob)


def _json_strings(obj: object) -> Iterator[str]:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x


def views(p: Path, data: bytes) -> Iterator[bytes]:
    """Every form in which a file's contents could hold a key (see the module's doc)."""
    yield data
    if p.suffix == ".parquet":
        try:
            import pandas as pd

            yield pd.read_parquet(p).to_csv(index=False).encode()
        except Exception:  # noqa: BLE001 - an unreadable parquet is searched as bytes only
            pass
    if len(data) > _MAX_DECODE:
        return
    yield from _base64_views(data)
    if data[:1] in (b"{", b"["):
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return
        for s in _json_strings(doc):
            yield from _base64_views(s.encode("utf-8", "replace"))


def leaked_files(root: Path, keys: list[str], exclude: tuple[Path, ...] = ()) -> list[str]:
    """Files under root holding any key, in any of their `views`."""
    needles = [k.encode() for k in keys if k]
    hits = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(e in p.parents for e in exclude):
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if any(n in v for v in views(p, data) for n in needles):
            hits.append(str(p))
    return hits
