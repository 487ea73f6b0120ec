"""The run store: everything one experiment run writes, under `<root>/<run_id>/`.

Layout (each phase reads its inputs from here, so any phase can be re-run with a run id):
    config.yaml            the config snapshot the run was started with
    plan-<phase>.json      the planned requests of a phase (order, seed)
    endpoints.json         what deploy started (no keys)
    records/<phase>.jsonl  append-only journal, one line per request sent (fsync'd: survives kill -9)
    records/<phase>.parquet  the same records, written atomically when the phase finishes
    evaluation.json, decision.json, report.md, report.html, teardown.json
    logs/<arm>.log         server logs of local arms
Whole-file writes go to a temporary file in the same directory and are renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from guided_ab.config import ConfigError, ExperimentConfig, parse_config
from guided_ab.records import RequestRecord, records_frame

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or "") or ".." in run_id:
        raise ConfigError(
            f"run id {run_id!r} is not valid: use letters, digits, '.', '_' and '-' only "
            "(no '/' or '..'); `guided-ab runs` lists existing run ids"
        )
    return run_id


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class RunStore:
    """One run's directory. Creating it checks that the root is writable before anything starts."""

    def __init__(self, root: str | Path, run_id: str):
        self.run_id = check_run_id(run_id)
        self.root = Path(root)
        self.dir = (self.root / run_id).resolve()
        if self.root.resolve() not in self.dir.parents:
            raise ConfigError(f"run id {run_id!r} would leave the store directory {self.root}")

    # -- creation and lookup -------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: ExperimentConfig, run_id: str | None = None) -> RunStore:
        store = cls(cfg.store, run_id or new_run_id(cfg.name))
        try:
            (store.dir / "records").mkdir(parents=True, exist_ok=True)
            (store.dir / "logs").mkdir(exist_ok=True)
            probe = store.dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"store: cannot write the run directory {store.dir} ({err.strerror}); "
                "set 'store' in the config to a writable directory"
            ) from None
        if not (store.dir / "config.yaml").exists():
            store.save_config(cfg)
        return store

    @classmethod
    def open(cls, root: str | Path, run_id: str) -> RunStore:
        store = cls(root, run_id)
        if not (store.dir / "config.yaml").is_file():
            raise ConfigError(
                f"run {run_id!r} not found under {Path(root).resolve()} (no config.yaml); "
                "`guided-ab runs` lists the runs in a store"
            )
        return store

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # -- config --------------------------------------------------------------------------------
    def save_config(self, cfg: ExperimentConfig) -> None:
        atomic_write_text(self.path("config.yaml"), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def load_config(self) -> ExperimentConfig:
        p = self.path("config.yaml")
        return parse_config(yaml.safe_load(p.read_text()), str(p))

    # -- JSON documents ------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        atomic_write_text(p, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        return p

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path(name)
        if not p.is_file():
            if default is not None:
                return default
            raise ConfigError(f"{p} is missing: run the phase that writes it first")
        return json.loads(p.read_text())

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    # -- records -------------------------------------------------------------------------------
    def journal_path(self, phase: str) -> Path:
        return self.path("records", f"{phase}.jsonl")

    def append_record(self, rec: RequestRecord) -> None:
        """Append one record to the phase journal and fsync it (a kill right after loses nothing)."""
        p = self.journal_path(rec.phase)
        p.parent.mkdir(parents=True, exist_ok=True)
        line = rec.model_dump_json() + "\n"
        with open(p, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _journal_rows(self, phase: str) -> list[dict]:
        """The phase journal's records as dicts. A torn line (killed mid-write) is skipped: only
        the last line can be torn, and it was never acknowledged."""
        import orjson

        p = self.journal_path(phase)
        rows = []
        if p.is_file():
            with open(p, "rb") as f:
                for line in f:
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and "request_id" in row and "outcome" in row:
                        rows.append(row)
        return rows

    def journal(self, phase: str) -> list[RequestRecord]:
        """The records of a phase's journal (a torn last line dropped)."""
        out = []
        for row in self._journal_rows(phase):
            try:
                out.append(RequestRecord.model_validate(row))
            except ValueError:
                continue
        return out

    def _journal_frame(self, phase: str) -> pd.DataFrame:
        """The journal as a DataFrame, without a model object per line (100k records: ~3x less memory)."""
        return records_frame(self._journal_rows(phase))

    def finalize_records(self, phase: str) -> Path:
        """Write the phase's journal as parquet, atomically."""
        df = self._journal_frame(phase)
        p = self.path("records", f"{phase}.parquet")
        tmp = p.with_suffix(".parquet.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, p)
        return p

    def records(self, phases: tuple[str, ...] = ("observe", "ab")) -> pd.DataFrame:
        """All records of the given phases (parquet where finalized, else the journal)."""
        frames = []
        for ph in phases:
            pq = self.path("records", f"{ph}.parquet")
            if pq.is_file() and (not self.journal_path(ph).is_file() or pq.stat().st_mtime >= self.journal_path(ph).stat().st_mtime):
                frames.append(pd.read_parquet(pq))
            else:
                frames.append(self._journal_frame(ph))
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else records_frame([])


def list_runs(root: str | Path) -> list[Path]:
    r = Path(root)
    if not r.is_dir():
        return []
    runs = [d for d in r.iterdir() if d.is_dir() and (d / "config.yaml").is_file()]
    return sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)
