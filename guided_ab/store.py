"""The run store: everything one experiment run writes, under `<root>/<run_id>/`.

Layout (each phase reads its inputs from here, so any phase can be re-run with a run id):
    config.yaml            the config snapshot the run was started with
    plan-<phase>.json      the planned requests of a phase (order, seed)
    endpoints.json         what deploy started (no keys)
    records/<phase>.sent   append-only attempt log, one request id per line, written before it is sent
    records/<phase>.jsonl  append-only journal, one record per request that ended (fsync'd: survives kill -9)
    records/<phase>.parquet  the same records, written atomically when the phase finishes
    records/<phase>.lock   held (flock) by the one process sending the phase's requests; names it
    evaluation.json, decision.json, report.md, report.html, teardown.json
    sequential.json        a sequential A/B's design, judged looks and stop (guided_ab/looks.py)
    logs/<arm>.log         server logs of local arms
    metrics/<phase>/<arm>.jsonl  the arm's /metrics scraped while the phase ran, one line per scrape
                           (guided_ab/load/server_metrics.py), or a line saying why it was skipped
Whole-file writes go to a temporary file in the same directory and are renamed into place.

This module is the one reader and writer of these files: the load path appends through
`RunStore.open_journal` (a PhaseJournal), everything else reads through RunStore's methods.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import yaml

from guided_ab.config import ConfigError, ExperimentConfig, load_config
from guided_ab.errors import PhaseLocked, RunStateError
from guided_ab.records import RECORD_COLUMNS, RequestRecord, records_frame
from guided_ab.storage import is_object_store, local_store_path

STORE_FILE = "store.json"  # the run's store format: a newer one is refused on open (RunStore._check_format)
STORE_FORMAT = 1
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # fullmatch: `$` would let a trailing newline through


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
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

    root: Path | str  # a local store's directory, or an object store's URL (storage_object.ObjectRunStore)

    def __new__(cls, root: str | Path, run_id: str) -> RunStore:
        # an object store URL (s3://, gs://, az://) gets the object-store run (guided_ab/storage_object.py):
        # every caller keeps writing `RunStore(root, run_id)` / RunStore.open / RunStore.create
        if cls is RunStore and is_object_store(root):
            from guided_ab.storage_object import ObjectRunStore

            return super().__new__(ObjectRunStore)
        return super().__new__(cls)

    def __init__(self, root: str | Path, run_id: str):
        self.run_id = check_run_id(run_id)
        self.root = local_root = local_store_path(root)
        self.dir = (local_root / run_id).resolve()
        if local_root.resolve() not in self.dir.parents:
            raise ConfigError(f"run id {run_id!r} would leave the store directory {self.root}")

    # -- creation and lookup -------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: ExperimentConfig, run_id: str | None = None) -> RunStore:
        store = cls(cfg.store, run_id or new_run_id(cfg.name))
        store._prepare()
        if store._exists_config():
            store._check_format()
        else:
            store.write_json(STORE_FILE, {"format": STORE_FORMAT, "layout": store._layout})
            store.save_config(cfg)
        return store

    def _prepare(self) -> None:
        """Make the run directory and check that it is writable, before anything starts."""
        try:
            (self.dir / "records").mkdir(parents=True, exist_ok=True)
            (self.dir / "logs").mkdir(exist_ok=True)
            probe = self.dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"store: cannot write the run directory {self.dir} ({err.strerror}); "
                "set 'store' in the config to a writable directory"
            ) from None

    def _exists_config(self) -> bool:
        return (self.dir / "config.yaml").is_file()

    @property
    def _layout(self) -> str:
        return "local" if type(self) is RunStore else "parts"

    @classmethod
    def open(cls, root: str | Path, run_id: str) -> RunStore:
        store = cls(root, run_id)
        if not store._exists_config():
            where = root if is_object_store(root) else local_store_path(root).resolve()
            raise ConfigError(
                f"run {run_id!r} not found under {where} (no config.yaml); "
                "`guided-ab runs` lists the runs in a store"
            )
        store._check_format()
        return store

    def _check_format(self) -> None:
        """A run written by a newer guided-ab (a layout this version cannot read) is refused, never
        half-read. Runs from before store.json existed are format 1."""
        try:
            meta = self.read_json(STORE_FILE, default={"format": 1})
            fmt = int(meta.get("format", 1))
        except (RunStateError, AttributeError, TypeError, ValueError):
            raise ConfigError(f"{self.where(STORE_FILE)} is damaged: it should say the run's store format "
                              f'(e.g. {{"format": {STORE_FORMAT}}})') from None
        if fmt > STORE_FORMAT:
            raise ConfigError(
                f"run {self.run_id} in {self.location} was written by a newer guided-ab (store format {fmt}; this "
                f"version reads up to {STORE_FORMAT}): upgrade guided-ab to read it (pip install -U guided-ab)"
            )

    @property
    def location(self) -> str:
        """Where the run is, for people: its directory, or its URL in an object store."""
        return str(self.dir)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def uri(self, name: str) -> str:
        """A link to one of the run's files (file://, or the object store URL)."""
        return self.path(name).as_uri()

    def where(self, name: str) -> str:
        """One of the run's files, for a message: its path, or its object store URL."""
        return str(self.path(name))

    # -- whole files (reports, plots): written whole, atomically -------------------------------
    def write_bytes(self, name: str, data: bytes) -> str:
        atomic_write_bytes(self.path(name), data)
        return str(self.path(name))

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError if there is none."""
        return self.path(name).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    # -- config --------------------------------------------------------------------------------
    def save_config(self, cfg: ExperimentConfig) -> None:
        atomic_write_text(self.path("config.yaml"), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def load_config(self) -> ExperimentConfig:
        """The run's config snapshot; a broken one is a ConfigError naming the file and field."""
        return load_config(self.path("config.yaml"))

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
            raise RunStateError(f"{p} is missing: run the phase that writes it first")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # a damaged run directory: name the file, no traceback
            raise RunStateError(f"{p} is damaged (not JSON this can read: {str(err)[:200]}); restore it or "
                                "re-run the phase that writes it") from None

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    # -- records -------------------------------------------------------------------------------
    def journal_path(self, phase: str) -> Path:
        return self.path("records", f"{phase}.jsonl")

    def _sent_path(self, phase: str) -> Path:
        return self.path("records", f"{phase}.sent")

    def _parquet_path(self, phase: str) -> Path:
        return self.path("records", f"{phase}.parquet")

    def has_journal(self, phase: str) -> bool:
        return self.journal_path(phase).is_file()

    def open_journal(self, phase: str) -> PhaseJournal:
        """The phase's attempt log and journal, open for appending (inside a running event loop)."""
        return PhaseJournal(self._sent_path(phase), self.journal_path(phase))

    def append_record(self, rec: RequestRecord) -> None:
        """Append one record to the phase journal and fsync it (a kill right after loses nothing)."""
        fd = _open_appending(self.journal_path(rec.phase))
        try:
            _write_all(fd, _record_line(rec))
            os.fsync(fd)
        finally:
            os.close(fd)

    def sent_counts(self, phase: str) -> Counter[str]:
        """How many times each request id of the phase was sent (its attempt log)."""
        p = self._sent_path(phase)
        if not p.is_file():
            return Counter()
        # bytes a crash (or a disk) garbled are no request id: never a reason the phase cannot resume
        return Counter(line.strip() for line in p.read_text(errors="replace").splitlines() if line.strip())

    def _journal_pairs(self, phase: str) -> Iterator[tuple[dict, RequestRecord]]:
        """The phase journal's valid records, one at a time, as (the line's dict, its record). A
        torn line (killed mid-write) is skipped: only the last line can be torn, and it was never
        acknowledged; so is any line that is not a valid record (garbage the disk or a hand
        left there would otherwise reach the parquet and the statistics)."""
        p = self.journal_path(phase)
        if not p.is_file():
            return
        with open(p, "rb") as f:
            for line in f:
                try:
                    row = orjson.loads(line)
                    if isinstance(row, dict):
                        yield row, RequestRecord.model_validate(row)
                except ValueError:  # orjson.JSONDecodeError and pydantic's ValidationError alike
                    continue

    def _journal_rows(self, phase: str) -> Iterator[dict]:
        """The valid records as dicts (no model object kept per line: 100k records, ~3x less memory)."""
        return (row for row, _ in self._journal_pairs(phase))

    def _journal_records(self, phase: str) -> Iterator[RequestRecord]:
        return (rec for _, rec in self._journal_pairs(phase))

    def journal(self, phase: str) -> list[RequestRecord]:
        """The records of a phase's journal (a torn last line dropped)."""
        return list(self._journal_records(phase))

    def recorded_ids(self, phase: str) -> set[str]:
        """Request ids with a valid record in the journal: the rule of `journal`, keeping only the
        ids in memory (a resumed 100k-request phase reads them all)."""
        return {rec.request_id for rec in self._journal_records(phase)}

    def _journal_frame(self, phase: str) -> pd.DataFrame:
        """The journal as a DataFrame, without a model object per line (100k records: ~3x less memory)."""
        return records_frame(list(self._journal_rows(phase)))

    def finalize_records(self, phase: str) -> Path:
        """Write the phase's journal as parquet, atomically (a temporary file of its own: two
        finalizations at once never write into one file)."""
        df = self._journal_frame(phase)
        p = self._parquet_path(phase)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    @contextmanager
    def phase_lock(self, phase: str) -> Iterator[None]:
        """One writer per phase of a run: the phase's requests are sent by whoever holds this.

        A second process (or thread) gets PhaseLocked naming the holder, at once: two writers
        would both send the requests not yet recorded (duplicates) and finalize at once. The
        lock is an flock on records/<phase>.lock, so the kernel drops it when its holder dies
        (a SIGKILLed phase never blocks its resume); the file names the holder.
        """
        p = self.path("records", f"{phase}.lock")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # the holder writes its name right after it takes the lock: give it a moment
                data = os.pread(fd, 4096, 0)
                for _ in range(40):
                    if data:
                        break
                    time.sleep(0.05)
                    data = os.pread(fd, 4096, 0)
                raise PhaseLocked(self._lock_holder(phase, data)) from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                      "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock_holder(self, phase: str, data: bytes) -> str:
        try:
            h = json.loads(data)
            who = (f"pid {h['pid']} on {h['host']} (`{h['command']}`), "
                   f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since']))}")
        except (ValueError, KeyError, TypeError):
            who = "another process (starting)"
        return (f"phase {phase} of run {self.run_id} is being sent by {who}: one writer per phase; wait for it "
                f"to end (or stop it), then `guided-ab {phase} --run-id {self.run_id}` resumes what is left")

    def finalized_records(self, phase: str) -> pd.DataFrame | None:
        """The phase's parquet as last written by finalize_records (None before the first)."""
        pq = self._parquet_path(phase)
        return pd.read_parquet(pq) if pq.is_file() else None

    def records(self, phases: tuple[str, ...] = ("observe", "ab")) -> pd.DataFrame:
        """All records of the given phases (parquet where finalized, else the journal)."""
        frames = []
        for ph in phases:
            pq = self._parquet_path(ph)
            if pq.is_file() and (not self.journal_path(ph).is_file() or pq.stat().st_mtime >= self.journal_path(ph).stat().st_mtime):
                try:
                    frames.append(_with_record_columns(pd.read_parquet(pq)))
                    continue
                except Exception:  # noqa: BLE001 - a damaged parquet: the journal holds the same records
                    if not self.journal_path(ph).is_file():
                        raise RunStateError(f"{pq} is damaged and there is no journal to read instead") from None
            frames.append(self._journal_frame(ph))
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else records_frame([])

    # -- server metrics ------------------------------------------------------------------------
    def _metrics_path(self, phase: str, arm: str) -> Path:
        return self.path("metrics", phase, f"{arm}.jsonl")

    def append_metric_scrape(self, phase: str, arm: str, scrape: dict[str, Any]) -> None:
        """One scrape of an arm's /metrics during a phase ({t, arm, values...}, or {t, arm, skipped}).
        One write, no fsync: a scrape lost to a crash costs one point of a time series."""
        fd = _open_appending(self._metrics_path(phase, arm))
        try:
            _write_all(fd, orjson.dumps(scrape) + b"\n")
        finally:
            os.close(fd)

    def metric_scrapes(self, phase: str, *, include_skipped: bool = False) -> dict[str, list[dict]]:
        """arm -> its scrapes of the phase in the order taken (torn or foreign lines dropped); the
        lines saying why an arm was skipped only with `include_skipped`; {} when nothing was scraped."""
        d = self.path("metrics", phase)
        out: dict[str, list[dict]] = {}
        if not d.is_dir():
            return out
        for p in sorted(d.glob("*.jsonl")):
            rows = []
            for line in p.read_bytes().splitlines():
                try:
                    row = orjson.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("t"), int | float) and (include_skipped or "skipped" not in row):
                    rows.append(row)
            if rows:
                out[p.stem] = rows
        return out


def _with_record_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A parquet written before a record column existed (e.g. `custom_id`): the column, empty, in
    its place (RECORD_COLUMNS' order, as a journal reads; columns this version does not know last)."""
    missing = [col for col in RECORD_COLUMNS if col not in frame.columns]
    if not missing:
        return frame
    for col in missing:
        frame[col] = None
    # in the records' column order (as a frame of today's records), any unknown columns after them
    return frame[[*RECORD_COLUMNS, *(c for c in frame.columns if c not in RECORD_COLUMNS)]][[*RECORD_COLUMNS, *(c for c in frame.columns if c not in RECORD_COLUMNS)]]


def list_runs(root: str | Path) -> list[Path]:
    r = Path(root)
    if not r.is_dir():
        return []
    runs = [d for d in r.iterdir() if d.is_dir() and (d / "config.yaml").is_file()]
    return sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)


# -- appending to the journal ---------------------------------------------------------------------
def _record_line(rec: RequestRecord) -> bytes:
    return (rec.model_dump_json() + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_appending(path: Path) -> int:
    """An append-only descriptor of `path` (created with its directory). A line torn by a crash
    mid-write is ended first, so the next line stands alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: to see whether the last line was torn
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        _write_all(fd, b"\n")
    return fd


class PhaseJournal:
    """A phase's attempt log (`<phase>.sent`) and record journal (`<phase>.jsonl`), appended line
    by line while its requests run; from RunStore.open_journal, used inside one event loop.

    Each line is one write(), so it is in the kernel (and survives a kill -9 of this process) as
    soon as the request is sent or recorded; fsync runs in a thread, at most one at a time and
    covering every line written before it (group commit), and once more at close(). An fsync per
    line on the event loop (~1 ms each here) would stall every other stream's clock and cap the
    request rate (bench/loadgen_vs_guidellm.py measures this path).
    """

    def __init__(self, sent_path: Path, journal_path: Path):
        self._fds = (_open_appending(sent_path), _open_appending(journal_path))
        self._dirty = False
        self._syncer: asyncio.Task | None = None

    def log_sent(self, request_id: str) -> None:
        """Before a request is sent: one more attempt of `request_id`."""
        _write_all(self._fds[0], (request_id + "\n").encode())
        self._changed()

    def append(self, rec: RequestRecord) -> None:
        """After a request ended: its record."""
        _write_all(self._fds[1], _record_line(rec))
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        if self._syncer is None:
            self._syncer = asyncio.get_running_loop().create_task(self._sync())

    def _fsync(self) -> None:
        for fd in self._fds:
            os.fsync(fd)

    async def _sync(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._dirty:
                self._dirty = False
                await loop.run_in_executor(None, self._fsync)
        finally:
            self._syncer = None

    async def close(self) -> None:
        """Wait for the fsync in flight, fsync once more and close both files."""
        if self._syncer is not None:
            try:
                await self._syncer
            except OSError:
                pass  # the final fsync below reports it
        try:
            self._fsync()
        finally:
            for fd in self._fds:
                os.close(fd)
