"""A run store on an object store (s3://, gs://, az://): the same RunStore methods, other files.

Object stores have no append and no rename, so the local store's append-only journal
(guided_ab/store.py) becomes immutable parts:
    records/<phase>.parts/<writer>-<seq>.json   one flush of one writer: {"sent": [ids], "records": [...]}
    records/<phase>.parts/<writer>.manifest.json  that writer's committed parts, rewritten after each part
    records/<phase>.parquet (+ .parquet.json)   the finalized records, and the parts they were made from
    records/<phase>.lock                        the phase's lease lock (below)
Each object is written whole with one PUT, which an object store makes visible entirely or not at
all: a process killed mid-upload leaves no part. A part counts once its writer's manifest names it
(the manifest is written after the part), so readers never see half a flush: a part uploaded whose
manifest update was lost is ignored, and its requests are sent again on resume, as the local
journal's requests in flight are. A part holds the attempt-log entries (`sent`) with the records of
the same flush, so a record is never committed without its attempt. Readers merge every writer's
parts and keep one record per request id, the highest attempt (two writers cannot normally both
send a phase: the lock; this keeps a run readable if they ever did).

A writer flushes every GUIDED_AB_PART_FLUSH_S seconds (default 1.0) or every GUIDED_AB_PART_RECORDS
records (default 500), whichever comes first, and at close. What a crash costs is at most that
window: those requests were sent but are not recorded, and a resumed phase sends them again.

The phase lock cannot be an flock: it is an object, `records/<phase>.lock`, created with a
conditional PUT (If-None-Match: *, S3's exclusive create; s3fs `mode="create"`), naming its holder
(host, pid, command) and renewed by the holder every third of its lease (GUIDED_AB_LOCK_LEASE_S,
default 60 s) with If-Match on its own ETag. Another process takes the lock over when the lease has
lapsed (its holder died or lost the network), or at once when the holder is on the same host and
its pid is gone (a SIGKILLed phase is resumed without waiting); the take-over is a conditional PUT
on the stale lock's ETag, so two processes racing for a stale lock cannot both win. Where the
filesystem has no conditional writes (gcsfs/adlfs builds without them), the lock is created
exclusively by the filesystem's own `mode="create"` if it has one; otherwise the rule is documented:
one writer per phase, as with a local store, and the lock object only names who is writing.
A lease compares the holder's last renewal (its clock) with the reader's clock: machines sharing a
store must keep their clocks in step (NTP) to well within the lease. Why not a lock server (Redis,
DynamoDB, Prefect's global concurrency limits)? The store is the one thing every phase already
shares, and S3's conditional writes make the object lock safe without another service.

Machine-local files (logs/<arm>.log of local arms) stay on the machine that runs the arm, under the
state directory (`GUIDED_AB_STATE_DIR`, see guided_ab/arms/base.py): `RunStore.path()` returns
only such local paths here.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import yaml

from guided_ab.config import ConfigError, ExperimentConfig, parse_config
from guided_ab.errors import PhaseLocked, RunStateError
from guided_ab.records import RequestRecord, records_frame
from guided_ab.storage import check_store_url, open_filesystem, probe_store, store_error
from guided_ab.store import RunStore, _record_line, _with_record_columns, check_run_id

MACHINE_LOCAL = ("logs",)  # the only files of an object-store run kept on the local disk


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={os.environ[name]!r} is not a number") from None


class ObjectRunStore(RunStore):
    """One run under an fsspec URL (`s3://bucket/prefix/<run_id>/`); see the module docstring."""

    def __init__(self, root: str | Path, run_id: str):
        from guided_ab.arms.base import state_dir

        self.run_id = check_run_id(run_id)
        self.root = check_store_url(str(root)).rstrip("/")  # an unknown scheme or a missing extra: ConfigError
        self.url = f"{self.root}/{run_id}"
        self.fs, base = open_filesystem(self.root)
        self._base = f"{base}/{run_id}"
        # machine-local files (server logs) of this run on this machine
        self.dir = state_dir() / "object-runs" / run_id
        self._probed = False
        self._uploads: list[Future] = []
        self._uploads_lock = threading.Lock()

    # -- creation and lookup -------------------------------------------------------------------
    def _prepare(self) -> None:
        """Probe the store: write and delete a small object under the run (exit 2 naming the URL if
        the bucket is missing, the credentials are, or they may not write). Once per store object."""
        if not self._probed:
            probe_store(str(self.root), self.run_id)
            self._probed = True

    def _exists_config(self) -> bool:
        # every command on a run writes something (evaluation.json at least): opening probes too
        self._prepare()
        try:
            return bool(self.fs.exists(self._key("config.yaml")))
        except Exception as err:  # noqa: BLE001
            raise store_error(self.root, "cannot read it", err) from None

    @property
    def location(self) -> str:
        return self.url

    def _key(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def path(self, *parts: str) -> Path:
        """Only machine-local files (logs/...) have a local path; the rest is in the object store
        and goes through this class's methods (an error here is a caller to route through them)."""
        if not parts or parts[0] not in MACHINE_LOCAL:
            raise RunStateError(f"{'/'.join(parts)} of run {self.run_id} is in the object store {self.url}, not on this "
                                "machine: read and write it through RunStore's methods")
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def uri(self, name: str) -> str:
        return f"{self.url}/{name}"

    def where(self, name: str) -> str:
        return self.uri(name)

    # -- whole objects -------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> str:
        try:
            self.fs.pipe_file(self._key(name), data)
        except Exception as err:  # noqa: BLE001
            raise store_error(self.root, f"cannot write {name}", err) from None
        return self.uri(name)

    def read_bytes(self, name: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        try:
            return bytes(self.fs.cat_file(self._key(name)))
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise store_error(self.root, f"cannot read {name}", err) from None

    def has(self, name: str) -> bool:
        return bool(self.fs.exists(self._key(name)))

    def save_config(self, cfg: ExperimentConfig) -> None:
        self.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def load_config(self) -> ExperimentConfig:
        where = self.uri("config.yaml")
        try:
            data = yaml.load(self.read_text("config.yaml"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
        except FileNotFoundError:
            raise ConfigError(f"{where}: not found") from None
        except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as err:
            raise ConfigError(f"{where}: not a config this can read ({str(err)[:300]})") from None
        return parse_config(data, where)

    def write_json(self, name: str, obj: Any) -> Path:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        return Path(name)  # no local path: callers that need one use uri()

    def read_json(self, name: str, default: Any = None) -> Any:
        try:
            raw = self.read_bytes(name)
        except FileNotFoundError:
            if default is not None:
                return default
            raise RunStateError(f"{self.uri(name)} is missing: run the phase that writes it first") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise RunStateError(f"{self.uri(name)} is damaged (not JSON this can read: {str(err)[:200]}); restore it or "
                                "re-run the phase that writes it") from None

    # -- records: parts and manifests ----------------------------------------------------------
    def _parts_dir(self, phase: str) -> str:
        return self._key("records", f"{phase}.parts")

    def journal_path(self, phase: str) -> Path:
        raise RunStateError(f"the journal of phase {phase} is in the object store {self.url} (parts, not a file): "
                            "read it through RunStore.journal / records")

    def has_journal(self, phase: str) -> bool:
        return bool(self._committed_parts(phase))

    def open_journal(self, phase: str) -> PartedJournal:  # type: ignore[override]
        return PartedJournal(self, phase)

    def append_record(self, rec: RequestRecord) -> None:
        """One record as a part of its own (a writer of one flush)."""
        w = _PartWriter(self, rec.phase)
        w.write([], [_record_line(rec).rstrip(b"\n")])

    def _committed_parts(self, phase: str) -> list[str]:
        """The parts the writers' manifests name, in writing order (writer ids start with the time)."""
        d = self._parts_dir(phase)
        try:
            names = self.fs.ls(d, detail=False)
        except FileNotFoundError:
            return []
        manifests = [n for n in names if n.endswith(".manifest.json")]
        if not manifests:
            return []
        parts: list[str] = []
        for raw in self.fs.cat(manifests, on_error="omit").values():
            try:
                listed = orjson.loads(raw)["parts"]
            except (ValueError, KeyError, TypeError):  # a manifest is written whole: damage is a hand's, not a crash's
                continue
            parts += [f"{d}/{p}" for p in listed if isinstance(p, str) and "/" not in p]
        return sorted(set(parts))

    def _part_payloads(self, phase: str, parts: list[str] | None = None) -> Iterator[dict]:
        parts = self._committed_parts(phase) if parts is None else parts
        if not parts:
            return
        blobs = self.fs.cat(parts, on_error="omit")  # concurrent GETs (s3fs)
        for p in parts:
            try:
                payload = orjson.loads(blobs[p])
            except (KeyError, ValueError):
                continue
            if isinstance(payload, dict):
                yield payload

    def sent_counts(self, phase: str) -> Counter[str]:
        c: Counter[str] = Counter()
        for payload in self._part_payloads(phase):
            c.update(x for x in payload.get("sent", ()) if isinstance(x, str) and x)
        return c

    def _journal_pairs(self, phase: str) -> Iterator[tuple[dict, RequestRecord]]:
        """Every writer's records merged, one per request id: the highest attempt (the first seen of equals)."""
        best: dict[str, tuple[dict, RequestRecord]] = {}
        for payload in self._part_payloads(phase):
            for row in payload.get("records", ()):
                if not isinstance(row, dict):
                    continue
                try:
                    rec = RequestRecord.model_validate(row)
                except ValueError:
                    continue
                have = best.get(rec.request_id)
                if have is None or rec.attempt > have[1].attempt:
                    best[rec.request_id] = (row, rec)
        yield from best.values()

    def _parquet_key(self, phase: str) -> str:
        return self._key("records", f"{phase}.parquet")

    def finalize_records(self, phase: str) -> Path:
        """The merged records as parquet, with the list of parts it was made from beside it: a
        reader knows it is stale when a resumed phase added parts since."""
        parts = self._committed_parts(phase)
        rows = [row for row, _ in self._journal_pairs(phase)]
        buf = io.BytesIO()
        records_frame(rows).to_parquet(buf, index=False)
        self.write_bytes(f"records/{phase}.parquet", buf.getvalue())
        self.write_bytes(f"records/{phase}.parquet.json", orjson.dumps({"parts": [p.rsplit("/", 1)[1] for p in parts]}))
        return Path("records", f"{phase}.parquet")

    def finalized_records(self, phase: str) -> pd.DataFrame | None:
        try:
            raw = self.read_bytes(f"records/{phase}.parquet")
        except FileNotFoundError:
            return None
        return pd.read_parquet(io.BytesIO(raw))

    def records(self, phases: tuple[str, ...] = ("observe", "ab")) -> pd.DataFrame:
        frames = []
        for ph in phases:
            parts = [p.rsplit("/", 1)[1] for p in self._committed_parts(ph)]
            try:
                covered = orjson.loads(self.read_bytes(f"records/{ph}.parquet.json")).get("parts")
            except (FileNotFoundError, ValueError, AttributeError):
                covered = None
            if covered is not None and sorted(covered) == parts:
                try:
                    frames.append(_with_record_columns(pd.read_parquet(io.BytesIO(self.read_bytes(f"records/{ph}.parquet")))))
                    continue
                except Exception:  # noqa: BLE001 - a damaged parquet: the parts hold the same records
                    if not parts:
                        raise RunStateError(f"{self.uri(f'records/{ph}.parquet')} is damaged and there is no journal to read instead") from None
            frames.append(self._journal_frame(ph))
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else records_frame([])

    # -- server metrics ------------------------------------------------------------------------
    def append_metric_scrape(self, phase: str, arm: str, scrape: dict[str, Any]) -> None:
        """One scrape as an object of its own, uploaded in a background thread: this is called on
        the load generator's event loop, which a PUT must never stall. A scrape lost to a crash costs
        one point of a time series, as the local store's unsynced line does."""
        key = self._key("metrics", phase, arm, f"{time.time_ns():020d}-{secrets.token_hex(3)}.json")
        data = orjson.dumps(scrape)
        with self._uploads_lock:
            self._uploads = [f for f in self._uploads if not f.done()]
            self._uploads.append(_background().submit(self.fs.pipe_file, key, data))

    def metric_scrapes(self, phase: str, *, include_skipped: bool = False) -> dict[str, list[dict]]:
        for f in list(self._uploads):  # this process's own scrapes first
            try:
                f.result(timeout=60)
            except Exception:  # noqa: BLE001 - a lost point of a time series
                pass
        try:
            keys = self.fs.find(self._key("metrics", phase))
        except FileNotFoundError:
            return {}
        if not keys:  # a phase without scrapes (no such phase, metrics off): find gives [], cat([]) raises
            return {}
        by_arm: dict[str, list[dict]] = {}
        for k, raw in sorted(self.fs.cat(keys, on_error="omit").items()):
            try:
                row = orjson.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("t"), int | float) and (include_skipped or "skipped" not in row):
                by_arm.setdefault(k.rsplit("/", 2)[-2], []).append(row)
        return {arm: sorted(rows, key=lambda r: r["t"]) for arm, rows in sorted(by_arm.items())}

    # -- the phase lock ------------------------------------------------------------------------
    @contextmanager
    def phase_lock(self, phase: str) -> Iterator[None]:
        lock = LeaseLock(self, self._key("records", f"{phase}.lock"), phase)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


_BACKGROUND: ThreadPoolExecutor | None = None


def _background() -> ThreadPoolExecutor:
    """One uploader thread for the small fire-and-forget objects (metric scrapes)."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-upload")
    return _BACKGROUND


def list_object_runs(root: str) -> list[str]:
    """Run ids under an object store root (those with a config.yaml), newest first by that object's time."""
    fs, base = open_filesystem(root)
    try:
        found = fs.glob(f"{base}/*/config.yaml", detail=True)
    except FileNotFoundError:
        return []
    except Exception as err:  # noqa: BLE001
        raise store_error(root, "cannot list it", err) from None

    def when(info: dict) -> float:
        t = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or 0
        return t.timestamp() if hasattr(t, "timestamp") else float(t or 0)

    return [k.rsplit("/", 2)[-2] for k, _ in sorted(found.items(), key=lambda kv: when(kv[1]), reverse=True)]


# -- writing parts -------------------------------------------------------------------------------
def _writer_id() -> str:
    # time first: parts sort in writing order across writers; host and pid say who wrote them
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return f"{time.time_ns():020d}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


class _PartWriter:
    """One writer's parts and manifest (one per opened journal: a phase run in one process)."""

    def __init__(self, store: ObjectRunStore, phase: str):
        self.store, self.phase = store, phase
        self.id = _writer_id()
        self.parts: list[str] = []

    def write(self, sent: list[str], records: list[bytes]) -> None:
        """One part, then the manifest naming it (the part counts only from then on)."""
        if not sent and not records:
            return
        d = self.store._parts_dir(self.phase)
        name = f"{self.id}-{len(self.parts):06d}.json"
        # the records are JSON already (RequestRecord.model_dump_json): joined, not parsed again
        body = b'{"sent":' + orjson.dumps(sent) + b',"records":[' + b",".join(records) + b"]}"
        fs = self.store.fs
        try:
            fs.pipe_file(f"{d}/{name}", body)
            manifest = orjson.dumps({"writer": self.id, "parts": [*self.parts, name]})
            fs.pipe_file(f"{d}/{self.id}.manifest.json", manifest)
        except Exception as err:  # noqa: BLE001
            raise store_error(self.store.root, f"cannot write a journal part of phase {self.phase}", err) from None
        self.parts.append(name)


class PartedJournal:
    """The object-store counterpart of store.PhaseJournal: `log_sent` and `append` buffer in memory;
    a background task uploads what was buffered as one part every flush interval (or sooner, once
    `GUIDED_AB_PART_RECORDS` records wait), one upload at a time, in a thread (the event loop keeps
    timing the requests); `close` uploads the rest."""

    def __init__(self, store: ObjectRunStore, phase: str):
        self._writer = _PartWriter(store, phase)
        self._flush_s = max(0.0, _env_float("GUIDED_AB_PART_FLUSH_S", 1.0))
        self._flush_records = max(1, int(_env_float("GUIDED_AB_PART_RECORDS", 500)))
        self._sent: list[str] = []
        self._records: list[bytes] = []
        self._flusher: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._error: BaseException | None = None

    def log_sent(self, request_id: str) -> None:
        self._sent.append(request_id)
        self._changed()

    def append(self, rec: RequestRecord) -> None:
        self._records.append(_record_line(rec).rstrip(b"\n"))
        self._changed()

    def _changed(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        elif len(self._records) >= self._flush_records:
            self._wake.set()

    def _take(self) -> tuple[list[str], list[bytes]]:
        sent, records = self._sent, self._records  # swapped on the event loop's thread: no append is lost
        self._sent, self._records = [], []
        return sent, records

    async def _upload(self, sent: list[str], records: list[bytes]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._writer.write, sent, records)
        except BaseException as err:
            # kept for the next flush (the same lines, in a new part): an upload that failed wrote nothing
            self._sent[:0], self._records[:0] = sent, records
            self._error = err
            raise

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        try:
            while self._sent or self._records:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._flush_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
                    await self._upload(*self._take())
                except Exception:  # noqa: BLE001 - retried at the next flush; close() reports it if it stays
                    await asyncio.sleep(min(5.0, self._flush_s or 0.5))
                else:
                    self._error = None
        finally:
            self._flusher = None

    async def close(self) -> None:
        """Upload everything buffered (the flusher's upload in flight first)."""
        if self._flusher is not None:
            if self._wake is not None:
                self._wake.set()
            try:
                await self._flusher
            except Exception:  # noqa: BLE001 - the final upload below reports it
                pass
        if self._sent or self._records:
            await self._upload(*self._take())


# -- the lease lock ------------------------------------------------------------------------------
def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "renewed": time.time(),
            "lease_s": _env_float("GUIDED_AB_LOCK_LEASE_S", 60.0), "token": secrets.token_hex(8),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class LeaseLock:
    """The phase lock of an object-store run (the module docstring says how and why)."""

    def __init__(self, store: ObjectRunStore, key: str, phase: str):
        self.store, self.key, self.phase = store, key, phase
        self.fs = store.fs
        self.etag: str | None = None
        self.holder = _holder()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _put(self, data: dict[str, Any], **cond: Any) -> str | None:
        out = self.fs.pipe_file(self.key, json.dumps(data).encode(), **cond)
        return out.get("ETag") if isinstance(out, dict) else None

    def _create(self) -> bool:
        try:
            self.etag = self._put(self.holder, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without exclusive create: the documented one-writer rule
            if self.fs.exists(self.key):
                return False
            self.etag = self._put(self.holder)
            return True

    def acquire(self) -> None:
        try:
            if self._create():
                self._start_renewing()
                return
            info = self.fs.info(self.key)
            stale_etag = info.get("ETag")
            try:
                h = json.loads(self.fs.cat_file(self.key))
            except (ValueError, FileNotFoundError):
                h = {}
            if self._stale(h):
                try:
                    self.etag = self._put(self.holder, IfMatch=stale_etag) if stale_etag else self._put(self.holder)
                except (FileExistsError, FileNotFoundError, OSError):
                    raise PhaseLocked(self._message(h)) from None
                self._start_renewing()
                return
        except PhaseLocked:
            raise
        except FileNotFoundError:  # released between our create and our read: try once more
            if self._create():
                self._start_renewing()
                return
            raise PhaseLocked(self._message({})) from None
        except Exception as err:  # noqa: BLE001
            raise store_error(self.store.root, f"cannot take the lock of phase {self.phase}", err) from None
        raise PhaseLocked(self._message(h))

    def _stale(self, h: dict) -> bool:
        try:
            if h.get("host") == socket.gethostname() and not _pid_alive(int(h["pid"])):
                return True  # its holder on this machine is gone (killed): no need to wait out the lease
            return time.time() > float(h["renewed"]) + float(h["lease_s"])
        except (KeyError, TypeError, ValueError):
            return False  # unreadable: a holder is writing it right now

    def _message(self, h: dict) -> str:
        run_id = self.store.run_id
        try:
            who = (f"pid {h['pid']} on {h['host']} (`{h['command']}`), since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since']))}; its lease runs out "
                   f"{max(0, round(float(h['renewed']) + float(h['lease_s']) - time.time()))} s after its last renewal if it died")
        except (KeyError, TypeError, ValueError):
            who = "another process (starting)"
        return (f"phase {self.phase} of run {run_id} is being sent by {who}: one writer per phase; wait for it "
                f"to end (or stop it), then `guided-ab {self.phase} --run-id {run_id} --store {self.store.root}` resumes what is left")

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-{self.phase}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        every = max(0.5, float(self.holder["lease_s"]) / 3)
        while not self._stop.wait(every):
            self.holder["renewed"] = time.time()
            try:
                self.etag = self._put(self.holder, **({"IfMatch": self.etag} if self.etag else {}))
            except (FileExistsError, FileNotFoundError):
                return  # taken over (our lease had lapsed): the new holder's; never overwrite it
            except Exception:  # noqa: BLE001 - a network blip: the next renewal tries again within the lease
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        try:
            h = json.loads(self.fs.cat_file(self.key))
            if h.get("token") == self.holder["token"]:  # still ours: never delete a holder that took over
                self.fs.rm_file(self.key)
        except Exception:  # noqa: BLE001 - a lock left behind lapses with its lease
            pass
