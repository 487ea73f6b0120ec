"""Experiment configuration: the pydantic models every phase reads, and the YAML loader.

A config is the pre-registration of an experiment: arms, workload, phases and the decision
rule are fixed here before any request is sent. Unknown keys are errors everywhere, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

import reprlib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from guided_ab.errors import ConfigError as ConfigError  # re-exported: `guided_ab.config.ConfigError` is its old home

Backend = Literal["auto", "guidance", "xgrammar", "outlines", "lm-format-enforcer"]
TargetKind = Literal["local", "modal", "external"]
Role = Literal["control", "candidate"]
Phase = Literal["deploy", "observe", "ab", "evaluate", "decide"]
ALL_PHASES: tuple[Phase, ...] = ("deploy", "observe", "ab", "evaluate", "decide")

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,38}$")]


class Strict(BaseModel):
    # no infinite or NaN numbers (a timeout of .inf would wait forever), and no booleans where a
    # number is meant (pydantic would read `size: true` as 1)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name:
            ann = cls.model_fields[info.field_name].annotation
            types = set(typing.get_args(ann)) or {ann}
            if bool not in types and (int in types or float in types):
                raise ValueError(f"a number, not a boolean ({str(v).lower()})")
        return v


# Modal's bounds, checked here so that a config Modal would refuse fails before anything starts
# (modal 1.6.4 checks scaledown_window in the SDK; GPU types and counts only on Modal's side, as
# documented at modal.com/docs/guide/gpu): GPU type -> most GPUs of it in one container.
MODAL_GPUS: dict[str, int] = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8,
}
MODAL_SCALEDOWN_S = (2, 3600)  # modal.App.function(scaledown_window=...): "must be between 2 and 3600"
MODAL_MAX_TIMEOUT_S = 24 * 3600  # a Modal function's timeouts are at most 24 h


class ModalReplicas(Strict):
    """How many containers serve one `modal` arm: Modal's autoscaler settings of the arm's web
    function (modal.App.function's min_containers / max_containers, @modal.concurrent's target_inputs).

    The default is one container, held warm from deploy to teardown, and never more: in an A/B,
    autoscaling blurs the comparison (a request that lands on a cold or a fresh container, with an
    empty prefix and grammar cache, is slower for reasons that are not its backend's, and the arms
    would scale differently). Replicas are for throughput tests and production-rate A/Bs on large
    models, where one container cannot take the load; the report then shows latency per container.
    """

    min_containers: int = Field(
        default=1, ge=0,
        description="containers kept warm from deploy to teardown (billed all that time); 0 lets the arm scale "
                    "to zero between phases, so a cold start can land inside a phase",
    )
    max_containers: int = Field(
        default=1, ge=1,
        description="most containers Modal may run for this arm under load (1: no autoscaling, the A/B default)",
    )
    target_inputs: int | None = Field(
        default=None, ge=1,
        description="requests per container Modal's autoscaler aims at before it adds a container "
                    "(@modal.concurrent(target_inputs=...)); unset: it scales on max_concurrent_inputs",
    )

    @model_validator(mode="after")
    def _modal_bounds(self) -> ModalReplicas:
        # modal 1.6.4 _Function.from_local: "`min_containers` (...) cannot be greater than `max_containers`"
        if self.min_containers > self.max_containers:
            raise ValueError(f"min_containers {self.min_containers} is above max_containers {self.max_containers}: "
                             "Modal refuses that; raise max_containers or lower min_containers")
        return self


class ModalSettings(Strict):
    """How a `modal` arm is served (see modal_apps/vllm_arm.py). Its containers (`replicas`; by
    default one) are held warm from deploy to teardown, so the arm costs GPU + CPU + memory for
    all that time, for each warm container."""

    gpu: str = Field(default="H100", description=f"a Modal GPU type: {', '.join(MODAL_GPUS)}")
    gpu_count: int = Field(default=1, ge=1, le=8)
    gpu_cost_per_hour: float = Field(default=3.95, ge=0, description="USD per GPU-hour, for the cost report")
    cpu: float = Field(default=4.0, ge=0.125, description="physical CPU cores requested (Modal bills at least this)")
    memory_gib: int = Field(default=32, ge=1, description="GiB of memory requested (Modal bills at least this)")
    cpu_cost_per_core_hour: float = Field(default=0.0472, ge=0, description="USD per core-hour (Modal list price)")
    memory_cost_per_gib_hour: float = Field(default=0.0080, ge=0, description="USD per GiB-hour (Modal list price)")
    startup_timeout_s: int = Field(default=1800, ge=60, le=MODAL_MAX_TIMEOUT_S)
    scaledown_window_s: int = Field(default=300)
    max_concurrent_inputs: int = Field(default=32, ge=1)
    max_model_len: int | None = Field(default=None, ge=256)
    revision: str | None = None
    api_key_secret: str = Field(default="guided-ab-api-key", description="modal.Secret holding VLLM_API_KEY")
    replicas: ModalReplicas = Field(
        default_factory=lambda: ModalReplicas(),
        description="containers serving the arm (min/max, autoscaler target); default one, warm, never more",
    )

    @field_validator("gpu")
    @classmethod
    def _modal_gpu(cls, v: str) -> str:
        if ":" in v or "," in v:
            raise ValueError(f"{v!r}: one GPU type without a count or fallbacks (the count is gpu_count; "
                             "both arms of an A/B must run on the same hardware)")
        if v.upper() not in MODAL_GPUS:
            raise ValueError(f"{v!r} is not a Modal GPU type; Modal's types are {', '.join(MODAL_GPUS)}")
        return v

    @field_validator("scaledown_window_s")
    @classmethod
    def _modal_scaledown(cls, v: int) -> int:
        lo, hi = MODAL_SCALEDOWN_S
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside Modal's bound: scaledown_window must be between {lo} and {hi} s")
        return v

    @model_validator(mode="after")
    def _modal_gpu_count(self) -> ModalSettings:
        most = MODAL_GPUS[self.gpu.upper()]
        if self.gpu_count > most:
            raise ValueError(f"gpu_count {self.gpu_count}: Modal gives at most {most} {self.gpu} GPUs to one container")
        return self

    @model_validator(mode="after")
    def _modal_target_inputs(self) -> ModalSettings:
        # modal 1.6.4 @modal.concurrent: "`target_inputs` parameter cannot be greater than `max_inputs`"
        target = self.replicas.target_inputs
        if target is not None and target > self.max_concurrent_inputs:
            raise ValueError(f"replicas.target_inputs {target} is above max_concurrent_inputs {self.max_concurrent_inputs} "
                             "(Modal's max_inputs, the hard limit per container): Modal refuses that")
        return self

    @property
    def cost_per_hour(self) -> float:
        """USD per hour one of the arm's containers is held: its GPUs, CPU cores and memory."""
        return (self.gpu_cost_per_hour * self.gpu_count + self.cpu * self.cpu_cost_per_core_hour
                + self.memory_gib * self.memory_cost_per_gib_hour)

    @property
    def warm_containers(self) -> int:
        """Containers the arm is billed for all the time it is held: min_containers, and at least
        the one that serves its requests (a scaled-to-zero arm starts one for its first request)."""
        return max(1, self.replicas.min_containers)

    @property
    def warm_cost_per_hour(self) -> float:
        """USD per hour the arm is held with its warm containers (what the cost estimates count)."""
        return self.cost_per_hour * self.warm_containers

    @property
    def max_cost_per_hour(self) -> float:
        """USD per hour with every container Modal may start (max_containers) up."""
        return self.cost_per_hour * self.replicas.max_containers


class Arm(Strict):
    """One serving configuration under test."""

    name: Name
    role: Role
    target: TargetKind = "local"
    backend: Backend
    model: str = Field(default="smollm2-135m", description="HF id, local path, or 'smollm2-135m' (the embedded model)")
    server_args: list[str] = Field(default_factory=list, description="extra vLLM server arguments")
    url: str | None = Field(default=None, description="base URL of an existing endpoint (target: external)")
    api_key_env: str | None = Field(default=None, description="env var holding the external endpoint's API key")
    cost_per_hour: float = Field(default=0.0, ge=0, description="USD per hour the arm is held (local/external)")
    modal: ModalSettings = Field(default_factory=lambda: ModalSettings())

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        # checked here, not at the first request 600 s later: an http(s) URL with a host
        if v is not None:
            try:
                TypeAdapter(HttpUrl).validate_python(v)
            except ValidationError:
                raise ValueError(f"{v[:200]!r} is not an http(s) URL with a host, e.g. http://10.0.0.5:8000") from None
        return v

    @model_validator(mode="after")
    def _target_fields(self) -> Arm:
        if self.target == "external" and not self.url:
            raise ValueError("an arm with target 'external' needs 'url' (the endpoint's base URL)")
        if self.target != "external" and self.url:
            raise ValueError(f"'url' is only for target 'external' (this arm's target is '{self.target}')")
        return self


class LoadProfile(Strict):
    """How one phase's requests are sent (guided_ab/load/runner.py, guided_ab/load/arrivals.py).

    closed: today's closed loop, `workload.concurrency` requests in flight, the next sent when one
    returns. constant / poisson: an open loop, arrivals at `rate` per second on a clock of their
    own (evenly spaced, or exponential gaps), whether or not the server keeps up; both arms of a
    pair arrive at one instant (so `rate` is requests/s per arm), and a request the cap held back
    is sent as soon as it can and recorded with its lag."""

    profile: Literal["closed", "constant", "poisson"] = "closed"
    rate: float | None = Field(default=None, description="open loop: arrivals (pairs) per second, i.e. requests/s per arm")
    max_in_flight: int | None = Field(default=None, ge=1, le=4096, description="open loop: cap on requests in flight (all arms together)")
    count: int | None = Field(default=None, ge=1, le=1_000_000, description="open loop: pairs to send (warm-ups first, in addition)")
    duration_s: float | None = Field(default=None, description="open loop: send the pairs the schedule holds in this many seconds (warm-ups first, in addition)")

    @field_validator("rate", "duration_s")
    @classmethod
    def _positive(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and v <= 0:
            what = "arrivals per second" if info.field_name == "rate" else "seconds"
            raise ValueError(f"{v:g}: must be > 0 ({what}); for no load leave the phase out of `phases`")
        return v

    @model_validator(mode="after")
    def _fields_of_profile(self) -> LoadProfile:
        given = [f for f in ("rate", "max_in_flight", "count", "duration_s") if getattr(self, f) is not None]
        if self.profile == "closed":
            if given:
                raise ValueError(f"{', '.join(given)}: only for an open loop (profile: constant or poisson); "
                                 "a closed loop sends workload.concurrency requests at a time")
            return self
        if self.rate is None:
            raise ValueError(f"rate: required for profile {self.profile} (arrivals per second, e.g. rate: 2)")
        if self.max_in_flight is None:
            raise ValueError(f"max_in_flight: required for profile {self.profile}: an open loop needs a cap on requests "
                             "in flight (a server that falls behind would otherwise get every arrival at once)")
        if self.count is not None and self.duration_s is not None:
            raise ValueError("count and duration_s: pre-register one of them, not both")
        return self

    @property
    def open_loop(self) -> bool:
        return self.profile != "closed"


class PhaseLoads(Strict):
    """The load profile of each sending phase (default: both closed loops)."""

    observe: LoadProfile = Field(default_factory=lambda: LoadProfile())
    ab: LoadProfile = Field(default_factory=lambda: LoadProfile())


class Workload(Strict):
    """What is sent: which schemas, how many, in which order, with which sampling settings."""

    suite: str = Field(default="functions", description="'functions' (built in), a JSONSchemaBench-style directory, or a .jsonl of requests to replay (OpenAI Batch API input format)")
    mode: Literal["schema", "tools"] = Field(default="schema", description="how a suite's schemas are sent: response_format json_schema, or as the parameters of one required function (tools + tool_choice); a .jsonl replay sends each line's own body")
    preflight: Literal["keep", "drop"] = Field(default="keep", description="requests whose prompt + max_tokens cannot fit the served context (counted with the server's /tokenize before the A/B): keep (send and classify as context_overflow) or drop (replace with other requests from the pool, recorded)")
    subsets: list[str] = Field(default_factory=list, description="sub-directories of a bench directory")
    size: int = Field(default=32, ge=1, le=100_000, description="schemas in the A/B phase (each goes to every arm)")
    repeats: int = Field(default=1, ge=1, le=100, description="times each A/B schema is sent to each arm")
    observe_size: int = Field(default=8, ge=0, description="requests to the candidate in the observe phase")
    warmup: int = Field(default=1, ge=0, le=100, description="warm-up requests per arm, excluded from statistics")
    seed: int = 20251027
    prompt_template: str = (
        "{prompt}\nReply with one compact JSON object (no line breaks) matching this JSON schema:\n{schema}"
    )
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=256, ge=1, le=32_768)
    stream_share: float = Field(default=1.0, ge=0, le=1, description="share of pairs sent streaming (1 = all, 0 = none)")
    concurrency: int = Field(default=2, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0, description="per-request timeout")
    max_schema_bytes: int = Field(default=262_144, ge=1024, description="schemas larger than this are refused")
    metrics_interval_s: float = Field(default=5.0, ge=0, le=3600,
                                      description="seconds between scrapes of each arm's /metrics while a phase sends "
                                                  "(also once at its start and end; guided_ab/load/server_metrics.py); 0: not scraped")
    validation_timeout_s: float = Field(default=2.0, gt=0, le=600,
                                        description="per answer; past it the request is `validation_timeout` (e.g. a backtracking regex)")
    load: PhaseLoads = Field(default_factory=lambda: PhaseLoads(),
                             description="per phase (observe, ab): closed (concurrency) or an open loop at a rate (constant, poisson)")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_schema(cls, v: str) -> str:
        if "{schema}" not in v:
            raise ValueError("prompt_template must contain '{schema}' (and may contain '{prompt}')")
        return v


class Sequential(Strict):
    """A sequential, budget-capped A/B (analysis/sequential.py): the plan grows one look of
    `pairs_per_look` pairs at a time, each look is judged on group-sequential repeated confidence intervals
    over schemas, and the A/B stops as soon as the verdict is settled or a cap is reached."""

    pairs_per_look: int = Field(default=16, ge=1, le=100_000, description="pairs added per look (new schemas first)")
    max_pairs: int = Field(default=200, ge=1, le=1_000_000, description="cap: A/B pairs in all (schema clusters x repeats)")
    max_usd: float | None = Field(default=None, gt=0, description="cap: estimated A/B spend (arms' USD/h x time sending)")
    min_latency_gain: float = Field(default=0.05, ge=0, lt=1, description="smallest worthwhile latency gain (1 - ratio); futility below it")
    min_success_gain: float = Field(default=0.02, ge=0, le=1, description="smallest worthwhile success gain (difference); futility below it")

    @model_validator(mode="after")
    def _look_within_cap(self) -> Sequential:
        if self.pairs_per_look > self.max_pairs:
            raise ValueError(f"pairs_per_look ({self.pairs_per_look}) is larger than max_pairs ({self.max_pairs})")
        return self


class DecisionRule(Strict):
    """Pre-registered thresholds. Defaults are the seed's criteria (auto-mode testing guide)."""

    success_margin: float = Field(default=0.05, ge=0, le=1, description="candidate may be this much less successful")
    latency_margin: float = Field(default=0.10, ge=0, le=10, description="candidate p50 may be this much slower (ratio-1)")
    backend_share_min: float = Field(default=0.90, ge=0, le=1, description="expected share of the control's backend under auto")
    expected_backend: str = Field(default="guidance", description="backend the candidate is expected to pick mostly")
    max_cv_ratio: float = Field(default=1.5, gt=0, description="candidate latency CV may be at most this x control's")
    max_error_share: float = Field(default=0.5, ge=0, le=1, description="above this server_error+timeout+connection_error share the run is invalid")
    max_workload_problem_share: float = Field(default=0.2, ge=0, le=1, description="above this share of A/B pairs refused for the workload's own sake (context_overflow, invalid_request) the run is invalid")
    equivalence_margin: float | None = Field(default=None, gt=0, le=10, description="TOST margin on the latency ratio (default: latency_margin)")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0, lt=1)
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100_000)
    # futility: "keep" needs a broken guardrail, or intervals that rule out a worthwhile gain on every primary
    min_latency_gain: float = Field(default=0.05, ge=0, lt=1, description="smallest worthwhile p50 latency gain (1 - ratio); keep by futility when the p50 ratio interval stays above 1 - this")
    min_success_gain: float = Field(default=0.02, ge=0, le=1, description="smallest worthwhile success-rate gain (difference); keep by futility when the interval stays below it")
    min_cost_saving: float | None = Field(default=None, gt=0, lt=1, description="pre-registers cost as a primary criterion: 'cheaper' when the cost-per-success ratio interval lies below 1 - this (None: cost is informational)")
    backend_expectation: Literal["hypothesis", "guardrail"] = Field(default="hypothesis", description="the backend-share expectation: a hypothesis the verdict reports, or a guardrail it enforces")
    sequential: Sequential | None = Field(default=None, description="a sequential, capped A/B instead of a fixed-size one")
    require_approval: bool = Field(default=False, description="a 'switch' waits for a human sign-off in the Prefect UI before it is published")
    approval_timeout_s: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600, description="no answer by then: recorded as not approved ('keep')")


class Production(Strict):
    """Phase 3, pre-registered (guided_ab/promote.py, guided_ab/monitor.py): where the winner is
    promoted, the live control it is watched against, and the monitoring window. The margins are
    the decision rule's (`decision.success_margin`, `decision.latency_margin`)."""

    target: Literal["modal", "external"] = Field(default="modal", description="modal: promote deploys the serving app; external: the operator changes the server, guided-ab records and monitors it")
    app_name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="modal: the team's production serving app (not gab-*: the reaper stops those)")
    control_app_name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="modal: the app serving the old configuration as the live control (default: <app_name>-control)")
    url: str | None = Field(default=None, description="external: the production endpoint's base URL")
    api_key_env: str | None = Field(default=None, description="external: env var holding the production endpoint's key")
    control_url: str | None = Field(default=None, description="external: an endpoint serving the old configuration (the live control)")
    control_api_key_env: str | None = Field(default=None, description="external: env var holding the control endpoint's key")
    window_days: float = Field(default=7.0, gt=0, le=90, description="length of the monitoring window")
    cadence_hours: float = Field(default=24.0, gt=0, le=24 * 30, description="time between monitoring runs")
    pairs_per_run: int = Field(default=20, ge=2, le=10_000, description="paired requests (production + control) per monitoring run")
    planned_pairs: int | None = Field(default=None, ge=2, le=1_000_000, description="pairs the window spends alpha over (default: pairs_per_run x runs in the window)")
    if_unclear: Literal["keep", "revert"] = Field(default="keep", description="the window's end with no guardrail settled either way: keep the new configuration (the A/B showed it) or revert")

    @field_validator("url", "control_url")
    @classmethod
    def _prod_url(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                TypeAdapter(HttpUrl).validate_python(v)
            except ValidationError:
                raise ValueError(f"{v[:200]!r} is not an http(s) URL with a host, e.g. https://prod.example.com") from None
        return v

    @model_validator(mode="after")
    def _where(self) -> Production:
        if self.target == "modal":
            if not self.app_name:
                raise ValueError("target 'modal' needs 'app_name' (the production serving app promote deploys)")
            for f in ("app_name", "control_app_name"):
                v = getattr(self, f)
                if v and v.startswith("gab-"):
                    raise ValueError(f"{f} {v!r} starts with 'gab-': the reaper stops such apps after an hour; pick another name")
        elif not (self.url and self.control_url):
            raise ValueError("target 'external' needs 'url' (production) and 'control_url' (an endpoint serving the old configuration)")
        return self

    @property
    def control_app(self) -> str:
        return self.control_app_name or f"{self.app_name}-control"

    @property
    def planned_runs(self) -> int:
        """Monitoring runs in the window (window / cadence, at least 1)."""
        return max(1, round(self.window_days * 24 / self.cadence_hours))

    @property
    def window_pairs(self) -> int:
        return self.planned_pairs or self.pairs_per_run * self.planned_runs


class Sweep(Strict):
    """A rate sweep (`guided-ab sweep`, guided_ab/sweep.py), pre-registered like the A/B. Per arm,
    one arm at a time: a closed loop of `saturation_concurrency` requests in flight measures the
    most the arm completes per second; then a ladder of `steps` open-loop rates from `low` to `high`
    times that maximum (or the explicit `rates`), each step `duration_s` long (at least
    `min_requests` arrivals) or exactly `count` arrivals, at most `max_in_flight` in flight. The
    knee: the highest rate up to which every step is sustained (achieved >= `knee_achieved_share`
    of the offered rate and p50 latency <= `knee_latency_factor` x the lowest rate's p50).
    The defaults fit the embedded default (two local CPU arms: well under 1 request/s each)."""

    saturation_concurrency: int = Field(default=6, ge=1, le=4096, description="closed loop: requests in flight while the maximum rate is measured (above the server's batch: it must queue)")
    saturation_requests: int = Field(default=18, ge=2, le=100_000, description="closed loop: requests sent to measure the maximum rate (~3x the concurrency: the loop is full between its first answer and its last send)")
    steps: int = Field(default=6, ge=2, le=30, description="open-loop rates on the ladder")
    low: float = Field(default=0.2, gt=0, le=10, description="the ladder's lowest rate, a fraction of the measured maximum")
    high: float = Field(default=1.2, gt=0, le=10, description="the ladder's highest rate, a fraction of the measured maximum")
    rates: list[float] | None = Field(default=None, min_length=2, max_length=30, description="explicit ladder in requests/s (ascending), instead of low/high/steps; the saturation step still runs")
    profile: Literal["constant", "poisson"] = Field(default="poisson", description="arrivals of each step: evenly spaced or exponential gaps")
    duration_s: float | None = Field(default=None, description="each step's schedule in seconds (default 30; not with count)")
    count: int | None = Field(default=None, ge=1, le=1_000_000, description="each step's arrivals (not with duration_s)")
    min_requests: int = Field(default=3, ge=1, le=10_000, description="with duration_s: at least this many arrivals per step (the lowest rates need a latency too)")
    max_in_flight: int = Field(default=32, ge=1, le=4096, description="cap on requests in flight during a step")
    knee_achieved_share: float = Field(default=0.95, gt=0, le=1, description="a step is sustained when achieved >= this x offered rate ...")
    knee_latency_factor: float = Field(default=2.0, gt=1, le=100, description="... and its p50 latency <= this x the lowest rate's p50")

    @field_validator("duration_s")
    @classmethod
    def _positive_duration(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"{v:g}: must be > 0 seconds")
        return v

    @field_validator("rates")
    @classmethod
    def _ascending_rates(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if any(r <= 0 for r in v):
                raise ValueError(f"{v}: every rate must be > 0 requests/s")
            if any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError(f"{v}: rates must be strictly ascending")
        return v

    @model_validator(mode="after")
    def _ladder(self) -> Sweep:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high:g}) must be above low ({self.low:g}): the ladder climbs")
        if self.count is not None and self.duration_s is not None:
            raise ValueError("count and duration_s: pre-register one of them, not both")
        if self.saturation_requests < 2 * self.saturation_concurrency:
            raise ValueError(f"saturation_requests ({self.saturation_requests}) must be at least 2 x saturation_concurrency "
                             f"({self.saturation_concurrency}): the maximum is measured while the loop is full, from its "
                             "first answer to its last send (3x gives a steadier figure)")
        return self

    @property
    def step_duration_s(self) -> float | None:
        """Each step's duration (None: steps are `count` arrivals)."""
        return None if self.count is not None else (self.duration_s or 30.0)


class _Overrides(Strict):
    """The base of `DecisionOverrides`: how a set of overrides applies to a rule."""

    def apply(self, rule: DecisionRule) -> DecisionRule:
        return rule.model_copy(update=self.model_dump(exclude_none=True))


# The sign-off is part of the pre-registration, not a threshold to re-evaluate with (flows/_approval.py)
APPROVAL_FIELDS = ("require_approval", "approval_timeout_s")


def _all_optional(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """`create_model` field definitions: every field of `model` (but `exclude`), optional with None
    (= unset) as its default, keeping its bounds and description."""
    return {name: (Optional[f.annotation], FieldInfo.merge_field_infos(f, default=None))  # noqa: UP045 (a runtime type)
            for name, f in model.model_fields.items() if name not in exclude}


# Derived from DecisionRule, so the overridable thresholds cannot drift from the rule's (every field,
# same bounds and descriptions; not `sequential`: a sequential design is fixed before the first look,
# `guided-ab continue` is how a run gets more pairs). A real pydantic model class, importable here: Prefect renders it as
# the `thresholds` parameter form. Type checkers cannot follow create_model: they see a stand-in
# that takes the thresholds as keywords.
if TYPE_CHECKING:
    class DecisionOverrides(_Overrides):
        def __init__(self, **thresholds: Any) -> None: ...
else:
    DecisionOverrides = create_model(
        "DecisionOverrides", __base__=_Overrides, __module__=__name__, **_all_optional(DecisionRule, exclude=("sequential", *APPROVAL_FIELDS)),
        __doc__="Thresholds to change when re-evaluating a finished run (unset fields keep the config's).",
    )


class ExperimentConfig(Strict):
    name: Name
    description: str = ""
    arms: list[Arm] = Field(min_length=2, max_length=8)
    workload: Workload = Field(default_factory=lambda: Workload())
    phases: list[Phase] = Field(default_factory=lambda: list(ALL_PHASES),
                                description="deploy (always) and observe and/or ab; evaluate and decide always follow")
    decision: DecisionRule = Field(default_factory=lambda: DecisionRule())
    store: str = Field(default="runs", description="run store root: a directory (relative to the working directory), "
                       "file:///path, or an object store URL s3://bucket/prefix (gs://, az:// with the gcs/azure extras)")
    server_start_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        """A known scheme whose library is installed (no network here: reachability, credentials and
        permissions are probed when the run is created or opened, guided_ab/storage_object.py)."""
        from guided_ab.storage import check_store_url

        if not v.strip():
            raise ValueError("store is empty: a directory such as 'runs', or s3://bucket/prefix")
        try:
            return check_store_url(v)
        except ConfigError as err:  # pydantic names the field: the message without our own prefix
            raise ValueError(str(err).removeprefix("store: ")) from None
    production: Production | None = Field(default=None, description="phase 3: promote the winner, monitor it against a live control, keep or revert")
    sweep: Sweep | None = Field(default=None, description="`guided-ab sweep`: saturation, then a ladder of open-loop rates per arm (defaults when absent)")

    @model_validator(mode="after")
    def _roles(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        controls = [a.name for a in self.arms if a.role == "control"]
        if len(controls) != 1:
            raise ValueError(f"exactly one arm must have role 'control', found {len(controls)}: {controls}")
        return self

    @model_validator(mode="after")
    def _load_profiles(self) -> ExperimentConfig:
        """Open-loop profiles the phases can honour (LoadProfile checks each profile alone)."""
        wl = self.workload
        for phase in ("observe", "ab"):
            lp: LoadProfile = getattr(wl.load, phase)
            where = f"workload.load.{phase}"
            if not lp.open_loop:
                continue
            sized = lp.count is not None or lp.duration_s is not None
            if phase == "ab" and self.decision.sequential is not None:
                if sized:  # each look is one batch of pairs_per_look pairs, with its own schedule at the rate
                    raise ValueError(f"{where}: a sequential A/B sends decision.sequential.pairs_per_look pairs per look "
                                     "(each look on its own schedule at the rate); remove count / duration_s")
            elif not sized:
                raise ValueError(f"{where}: pre-register how much an open loop sends: count (pairs) or duration_s")
            elif phase == "ab" and wl.repeats != 1:
                raise ValueError(f"workload.repeats: an open-loop A/B sends {where}.count pairs (or duration_s's), "
                                 "cycling the workload.size schemas; remove repeats")
            for arm in self.arms:  # Modal queues what its containers cannot take, outside vLLM, unseen
                if arm.target != "modal":
                    continue
                replicas = getattr(arm.modal, "replicas", None)
                room = arm.modal.max_concurrent_inputs * (replicas.max_containers if replicas is not None else 1)
                per_arm = -(-(lp.max_in_flight or 1) // len(self.arms))
                if per_arm > room:
                    raise ValueError(f"{where}.max_in_flight {lp.max_in_flight}: up to {per_arm} in flight per arm, but "
                                     f"arm '{arm.name}' takes {room} at once (Modal would queue the rest outside vLLM); "
                                     "lower max_in_flight or raise modal.max_concurrent_inputs")
        return self

    @field_validator("phases")
    @classmethod
    def _phases_run(cls, v: list[str]) -> list[str]:
        # the list is the pre-registration of what runs: every experiment deploys (then evaluates and
        # decides), so a list without deploy, or without observe or ab to send, would not be honoured
        if len(set(v)) != len(v):
            raise ValueError(f"each phase once, got {v}")
        if "deploy" not in v or not {"observe", "ab"} & set(v):
            raise ValueError(f"{v}: list deploy and observe and/or ab (every experiment deploys, then evaluates and decides)")
        return v

    @property
    def control(self) -> Arm:
        return next(a for a in self.arms if a.role == "control")

    @property
    def candidates(self) -> list[Arm]:
        return [a for a in self.arms if a.role == "candidate"]

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"no arm named {name!r}; arms are {[a.name for a in self.arms]}")


# what a message shows of a bad value: bounded, whatever the value (YAML aliases can make a
# small file a value of billions of elements)
_SHOW = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 80, 80, 4, 4
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000  # after YAML aliases are expanded; a real config has a few hundred


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid experiment config"]
    for e in err.errors()[:20]:
        where = ".".join(str(p)[:80] for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/local.yaml for the known fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {_SHOW.repr(e.get('input'))}"
        lines.append(f"  {where}: {msg[:500]}")
    return "\n".join(lines)


def _values(data: Any, limit: int) -> int:
    """How many values `data` holds once YAML aliases are expanded (counted up to `limit`): a
    shared sub-tree counts once per reference, computed once (memo by identity)."""
    memo: dict[int, int] = {}

    def count(x: Any) -> int:
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, dict):
            n = 1 + sum(min(limit, count(k) + count(v)) for k, v in x.items())
        elif isinstance(x, list):
            n = 1 + sum(min(limit, count(v)) for v in x)
        else:
            n = 1
        memo[id(x)] = n = min(n, limit)
        return n

    return count(data)


def parse_config(data: object, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields (name, arms, workload, ...)")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config; raise ConfigError naming the file and field on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found (pass a path such as configs/local.yaml)")
    try:  # bounded cost: the size before reading, the depth while parsing, aliases after
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes, over {MAX_CONFIG_BYTES}: not an experiment config")
        # libyaml's parser where PyYAML has it: linear, and it stops at 1000 levels of nesting
        # (the pure-Python scanner takes a minute on 50,000 nested brackets)
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        if "maximum nesting depth" in str(err):
            raise ConfigError(f"{p}: not a config: nested too deeply to read") from None
        raise ConfigError(f"{p}: not valid YAML: {str(err)[:1000]}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a config: nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the file: {err}") from None
    try:
        if _values(data, MAX_CONFIG_VALUES + 1) > MAX_CONFIG_VALUES:
            raise ConfigError(f"{p}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded: not an experiment config")
    except RecursionError:
        raise ConfigError(f"{p}: not a config: nested too deeply to read") from None
    return parse_config(data, str(p))
