"""What the servers themselves report while a phase runs: vLLM's Prometheus `/metrics`, scraped
beside the load and stored in the run store, so a latency difference can be split into the
server's queue, prefill and decode time.

`MetricsScraper` (an async context manager around a phase's requests) scrapes every arm once as
the phase starts, every `interval_s` seconds while it runs and once when it ends; each scrape is
one line of `metrics/<phase>/<arm>.jsonl` (RunStore.append_metric_scrape). It never slows or
fails the phase: it has its own HTTP session (it never takes a connection from the load's pool),
its own short timeout, and parses in a worker thread (a /metrics page is ~100 kB of text; parsed
on the event loop it would delay the sends of an open-loop profile). An arm whose first scrape
fails (no /metrics: 404, not Prometheus text, no vLLM metrics in it, unreachable, too slow) is
skipped for the rest of the phase with one warning, and the reason is stored for the report.

`time_split` turns the stored scrapes into the report's numbers: per arm, the mean queue,
prefill, decode, TTFT and end-to-end time per request the server finished during the phase (the
histograms' sum and count between the first and the last scrape), beside the client's own mean
TTFT and latency from the records, and the running/waiting requests and KV-cache use over time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from guided_ab.arms.base import Endpoint, resolve_key

if TYPE_CHECKING:
    import aiohttp
    import pandas as pd

    from guided_ab.store import RunStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# Metric names as vLLM 0.32 exports them (vllm/v1/metrics/loggers.py; tests/fixtures/vllm_metrics.txt
# is a real /metrics page of a vLLM 0.32 CPU server). Histograms: per-request times in seconds.
HISTOGRAMS = {
    # queued until scheduled: waiting for a batch slot, and for its grammar (vLLM 0.32 keeps a
    # structured-output request WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR, unscheduled, until the
    # grammar is compiled: v1/core/sched/scheduler.py), so a slow grammar compile shows here
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",  # scheduled until the first token
    "decode": "vllm:request_decode_time_seconds",  # first token until the last
    "inference": "vllm:request_inference_time_seconds",  # prefill + decode
    "ttft": "vllm:time_to_first_token_seconds",  # arrival until the first token (the server's TTFT)
    "e2e": "vllm:e2e_request_latency_seconds",  # arrival until the answer is complete
}
GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_cache": "vllm:kv_cache_usage_perc",  # a fraction (0..1) despite its name
}
COUNTERS = {
    "preemptions": "vllm:num_preemptions",
    "prompt_tokens": "vllm:prompt_tokens",
    "generation_tokens": "vllm:generation_tokens",
}
# the stored value names: "<metric>_sum" / "<metric>_count" of a histogram, "<metric>" of a gauge,
# "<metric>_total" of a counter (the sample names of the Prometheus text)
KEPT_SAMPLES = frozenset(
    [f"{h}_{s}" for h in HISTOGRAMS.values() for s in ("sum", "count")]
    + list(GAUGES.values())
    + [f"{c}_total" for c in COUNTERS.values()]
)
_AVERAGED = frozenset({GAUGES["kv_cache"]})  # a share per engine: the mean over engines, not the sum

DEFAULT_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 2.0
MAX_PAGE_BYTES = 8 * 2**20  # a vLLM page is ~30-100 kB
MAX_SERIES_POINTS = 240  # the report's time series: enough for a plot, small in evaluation.json


class NotMetrics(ValueError):
    """The answer of /metrics is not vLLM's Prometheus text."""


def metrics_url(ep: Endpoint) -> str:
    """The arm's /metrics: beside /v1 at the server root (Endpoint.base_url ends before /v1)."""
    return ep.base_url.rstrip("/").removesuffix("/v1") + "/metrics"


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, refused past MAX_PAGE_BYTES (an endpoint that streams without end is no /metrics)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise NotMetrics(f"a page of more than {MAX_PAGE_BYTES // 2**20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _kept_lines(text: str) -> tuple[str, bool]:
    """Only the sample lines of the kept metrics (by their name, up to the labels), and whether the
    page has any vLLM metric: the parser then reads ~20 lines, not the ~600 of a vLLM page (~1 ms
    instead of ~27 ms here). A cut by line prefix only; the lines are parsed by prometheus_client."""
    kept = []
    any_vllm = False
    for line in text.splitlines():
        if line.startswith("vllm:"):
            any_vllm = True
            if line.split("{", 1)[0].split(" ", 1)[0] in KEPT_SAMPLES:
                kept.append(line)
    return "\n".join(kept) + "\n", any_vllm


def parse_metrics(text: str) -> dict[str, float]:
    """The kept vLLM samples of a /metrics page, summed over label sets (model, engine) but the
    KV-cache share (averaged). NotMetrics if it is not Prometheus text or holds no vLLM metric."""
    from prometheus_client.parser import text_string_to_metric_families

    kept, any_vllm = _kept_lines(text)
    if not any_vllm:
        raise NotMetrics("no vllm: metric in it (not a vLLM server's Prometheus text)")
    sums: dict[str, float] = {}
    seen: dict[str, int] = {}
    try:
        for family in text_string_to_metric_families(kept):
            for sample in family.samples:
                if sample.name in KEPT_SAMPLES and math.isfinite(sample.value):
                    sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
                    seen[sample.name] = seen.get(sample.name, 0) + 1
    except (ValueError, TypeError, IndexError) as err:  # the parser's errors on text that is not Prometheus'
        raise NotMetrics(f"not Prometheus text ({str(err)[:120]})") from None
    return {k: v / seen[k] if k in _AVERAGED else v for k, v in sums.items()}


class MetricsScraper:
    """Scrapes the arms' /metrics while a phase runs (see the module docstring).

        async with MetricsScraper(store, "ab", endpoints):
            await run_plan(...)

    `interval_s` <= 0 turns the scraper off (nothing is stored).
    """

    def __init__(self, store: RunStore, phase: str, endpoints: Mapping[str, Endpoint], *,
                 interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.store, self.phase = store, phase
        self.endpoints = dict(endpoints)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.skipped: dict[str, str] = {}  # arm -> why it is not scraped in this phase
        self._ok: dict[str, int] = {arm: 0 for arm in self.endpoints}  # successful scrapes per arm
        self._warned: set[str] = set()
        self._keys: dict[str, str | None] = {}
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0 and bool(self.endpoints)

    async def __aenter__(self) -> MetricsScraper:
        if not self.enabled:
            return self
        import aiohttp

        for arm, ep in self.endpoints.items():
            try:
                self._keys[arm] = resolve_key(ep.key_ref)
            except Exception as err:  # noqa: BLE001 - the load reports a missing key itself; this only skips
                self._skip(arm, f"no API key ({err})")
        # its own session: never a connection the load's pool (limit = concurrency) waits for
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                           cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"metrics-{self.phase}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._task is None:
            return
        self._stop.set()
        try:
            try:
                # the periodic loop ends at once (or after the scrape in flight, bounded by the timeout)
                await asyncio.wait_for(asyncio.shield(self._task), timeout=self.timeout_s)
            except Exception:  # noqa: BLE001 - a stuck scrape is dropped, never the phase's failure
                self._task.cancel()
            if exc_type is None:  # the scrape at the phase's end (a stopped phase ends at once)
                await self.scrape_all()
        except Exception as err:  # noqa: BLE001 - the last scrape never fails a phase that succeeded
            log.warning("server metrics: the scrape at the end of phase %s failed: %s", self.phase, err)
        finally:
            self._task.cancel()
            if self._http is not None:
                await self._http.close()

    async def _loop(self) -> None:
        await self.scrape_all()  # at the phase start (beside the first requests, never before them)
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                await self.scrape_all()

    async def scrape_all(self) -> None:
        """One scrape of every arm not skipped, at once."""
        arms = [a for a in self.endpoints if a not in self.skipped]
        await asyncio.gather(*(self._scrape(a) for a in arms))

    async def _scrape(self, arm: str) -> None:
        import aiohttp

        assert self._http is not None
        ep = self.endpoints[arm]
        key = self._keys.get(arm)
        headers = {"Authorization": f"Bearer {key}"} if key else {}  # Modal's web endpoint: the run's key
        try:
            # redirects are not followed: the key would travel to wherever one points
            async with self._http.get(metrics_url(ep), headers=headers, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise NotMetrics(f"HTTP {resp.status}")
                text = (await _read_capped(resp)).decode("utf-8", errors="replace")
            t = time.time()
            values = await asyncio.to_thread(parse_metrics, text)
        except (NotMetrics, aiohttp.ClientError, OSError, TimeoutError, UnicodeError) as err:
            self._failed(arm, str(err) or type(err).__name__)
            return
        self._ok[arm] += 1
        self.store.append_metric_scrape(self.phase, arm, {"t": t, "arm": arm, **values})

    def _failed(self, arm: str, why: str) -> None:
        if self._ok[arm] == 0:  # no /metrics at all: skipped for the phase
            self._skip(arm, why)
        elif arm not in self._warned:  # it answered before: one lost scrape, keep trying
            self._warned.add(arm)
            log.warning("server metrics of arm '%s' (phase %s): a scrape failed (%s); scraping goes on",
                        arm, self.phase, why)

    def _skip(self, arm: str, why: str) -> None:
        self.skipped[arm] = why
        self._warned.add(arm)
        log.warning("server metrics of arm '%s' skipped in phase %s: %s at %s", arm, self.phase, why,
                    metrics_url(self.endpoints[arm]))
        self.store.append_metric_scrape(self.phase, arm, {"t": time.time(), "arm": arm, "skipped": why})


async def scraped(phase_coro: Coroutine[Any, Any, T], store: RunStore, phase: str, endpoints: Mapping[str, Endpoint],
                  *, interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    """Await a phase's sending coroutine with its arms' /metrics scraped beside it."""
    async with MetricsScraper(store, phase, endpoints, interval_s=interval_s, timeout_s=timeout_s):
        return await phase_coro


# -- the report's numbers --------------------------------------------------------------------------
def _delta(first: Mapping[str, Any], last: Mapping[str, Any], sample: str) -> float | None:
    if sample not in first or sample not in last:
        return None
    return float(last[sample]) - float(first[sample])


def _mean_per_request(first: Mapping[str, Any], last: Mapping[str, Any], hist: str) -> float | None:
    """The mean of a histogram over the requests it counted between two scrapes."""
    n = _delta(first, last, f"{hist}_count")
    s = _delta(first, last, f"{hist}_sum")
    if n is None or s is None or n <= 0:
        return None
    return s / n


def _series(scrapes: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Seconds since the first scrape, running and waiting requests and the KV-cache share;
    evenly thinned to MAX_SERIES_POINTS."""
    step = max(1, math.ceil(len(scrapes) / MAX_SERIES_POINTS))
    picked = list(scrapes[::step])
    if picked[-1] is not scrapes[-1]:
        picked.append(scrapes[-1])
    t0 = float(scrapes[0]["t"])
    out: dict[str, list[float | None]] = {"t": [round(float(s["t"]) - t0, 3) for s in picked]}
    for key, name in GAUGES.items():
        out[key] = [None if s.get(name) is None else float(s[name]) for s in picked]
    return out


def _client_view(records: pd.DataFrame | None, arm: str) -> dict[str, Any]:
    """The client's mean TTFT and latency over the phase's requests that reached the engine and were
    answered (warm-ups included: the server counted them too). A refusal (HTTP 4xx) never reaches
    the engine's histograms; a timeout or a cut connection has no latency to compare."""
    if records is None or not len(records) or "arm" not in records:
        return {"answered": 0, "ttft_mean_s": None, "latency_mean_s": None}
    import pandas as pd

    from guided_ab.records import TRANSIENT_OUTCOMES, WORKLOAD_OUTCOMES

    not_engine = TRANSIENT_OUTCOMES | WORKLOAD_OUTCOMES | {"rejected"}
    f = records[(records["arm"] == arm) & ~records["outcome"].isin(not_engine)]
    lat = pd.to_numeric(f["latency_s"], errors="coerce").dropna()
    ttft = pd.to_numeric(f["ttft_s"], errors="coerce").dropna()
    return {"answered": int(len(lat)), "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
            "latency_mean_s": float(lat.mean()) if len(lat) else None}


def time_split(scrapes: Mapping[str, Sequence[Mapping[str, Any]]], records: pd.DataFrame | None = None,
               *, phase: str = "ab") -> dict[str, Any]:
    """Per arm: where the server's time went over the phase, beside the client's view.

    scrapes: RunStore.metric_scrapes(phase, include_skipped=True); records: the phase's records.
    An arm with fewer than two scrapes has `why` instead of numbers (skipped, or too short a phase).
    """
    arms: dict[str, Any] = {}
    for arm, lines in scrapes.items():
        skipped = [s["skipped"] for s in lines if "skipped" in s]
        ok = sorted((s for s in lines if "skipped" not in s and "t" in s), key=lambda s: float(s["t"]))
        entry: dict[str, Any] = {"scrapes": len(ok), "client": _client_view(records, arm)}
        if len(ok) < 2:
            entry["why"] = (f"no /metrics ({skipped[-1]})" if skipped else
                            f"{len(ok)} scrape(s): too few to tell the server's time over the phase")
        else:
            first, last = ok[0], ok[-1]
            finished = _delta(first, last, f"{HISTOGRAMS['e2e']}_count")
            entry.update({
                "seconds": float(last["t"]) - float(first["t"]),
                "requests_finished": None if finished is None else int(round(finished)),
                "mean_s": {key: _mean_per_request(first, last, hist) for key, hist in HISTOGRAMS.items()},
                "preemptions": _delta(first, last, f"{COUNTERS['preemptions']}_total"),
                "peak": {key: max((float(s[name]) for s in ok if s.get(name) is not None), default=None)
                         for key, name in GAUGES.items()},
                "series": _series(ok),
            })
        arms[arm] = entry
    return {"phase": phase, "arms": arms}


def phase_time_split(store: RunStore, phase: str = "ab") -> dict[str, Any] | None:
    """time_split of a phase from the run store; None when nothing was scraped in it."""
    scrapes = store.metric_scrapes(phase, include_skipped=True)
    if not scrapes:
        return None
    records = store.records((phase,))
    return time_split(scrapes, records[records["phase"] == phase] if len(records) else records, phase=phase)
