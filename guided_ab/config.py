"""Experiment configuration: the pydantic models every phase reads, and the YAML loader.

A config is the pre-registration of an experiment: arms, workload, phases and the decision
rule are fixed here before any request is sent. Unknown keys are errors everywhere, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Backend = Literal["auto", "guidance", "xgrammar", "outlines", "lm-format-enforcer"]
TargetKind = Literal["local", "modal", "external"]
Role = Literal["control", "candidate"]
Phase = Literal["deploy", "observe", "ab", "evaluate", "decide"]
ALL_PHASES: tuple[Phase, ...] = ("deploy", "observe", "ab", "evaluate", "decide")

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,38}$")]


class ConfigError(ValueError):
    """A config (or another user input) is wrong; the message names the field or file and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModalSettings(Strict):
    """How a `modal` arm is served (see modal_apps/vllm_arm.py)."""

    gpu: str = "H100"
    gpu_count: int = Field(1, ge=1, le=8)
    gpu_cost_per_hour: float = Field(3.95, ge=0, description="USD per GPU-hour, for the cost report")
    startup_timeout_s: int = Field(1800, ge=60)
    scaledown_window_s: int = Field(300, ge=2)
    max_concurrent_inputs: int = Field(32, ge=1)
    max_model_len: int | None = Field(None, ge=256)
    revision: str | None = None
    api_key_secret: str = Field("guided-ab-api-key", description="modal.Secret holding VLLM_API_KEY")


class Arm(Strict):
    """One serving configuration under test."""

    name: Name
    role: Role
    target: TargetKind = "local"
    backend: Backend
    model: str = Field("smollm2-135m", description="HF id, local path, or 'smollm2-135m' (the embedded model)")
    server_args: list[str] = Field(default_factory=list, description="extra vLLM server arguments")
    url: str | None = Field(None, description="base URL of an existing endpoint (target: external)")
    api_key_env: str | None = Field(None, description="env var holding the external endpoint's API key")
    cost_per_hour: float = Field(0.0, ge=0, description="USD per hour the arm is held (local/external)")
    modal: ModalSettings = Field(default_factory=ModalSettings)

    @model_validator(mode="after")
    def _target_fields(self) -> Arm:
        if self.target == "external" and not self.url:
            raise ValueError("an arm with target 'external' needs 'url' (the endpoint's base URL)")
        if self.target != "external" and self.url:
            raise ValueError(f"'url' is only for target 'external' (this arm's target is '{self.target}')")
        return self


class Workload(Strict):
    """What is sent: which schemas, how many, in which order, with which sampling settings."""

    suite: str = Field("functions", description="'functions' (built in) or a JSONSchemaBench-style directory")
    subsets: list[str] = Field(default_factory=list, description="sub-directories of a bench directory")
    size: int = Field(32, ge=1, le=100_000, description="schemas in the A/B phase (each goes to every arm)")
    repeats: int = Field(1, ge=1, le=100, description="times each A/B schema is sent to each arm")
    observe_size: int = Field(8, ge=0, description="requests to the candidate in the observe phase")
    warmup: int = Field(1, ge=0, le=100, description="warm-up requests per arm, excluded from statistics")
    seed: int = 20251027
    prompt_template: str = (
        "{prompt}\nReply with one compact JSON object (no line breaks) matching this JSON schema:\n{schema}"
    )
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, le=32_768)
    stream_share: float = Field(1.0, ge=0, le=1, description="share of pairs sent streaming (1 = all, 0 = none)")
    concurrency: int = Field(2, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    max_schema_bytes: int = Field(262_144, ge=1024, description="schemas larger than this are refused")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_schema(cls, v: str) -> str:
        if "{schema}" not in v:
            raise ValueError("prompt_template must contain '{schema}' (and may contain '{prompt}')")
        return v


class DecisionRule(Strict):
    """Pre-registered thresholds. Defaults are the seed's criteria (auto-mode testing guide)."""

    success_margin: float = Field(0.05, ge=0, le=1, description="candidate may be this much less successful")
    latency_margin: float = Field(0.10, ge=0, le=10, description="candidate p50 may be this much slower (ratio-1)")
    backend_share_min: float = Field(0.90, ge=0, le=1, description="expected share of the control's backend under auto")
    expected_backend: str = Field("guidance", description="backend the candidate is expected to pick mostly")
    max_cv_ratio: float = Field(1.5, gt=0, description="candidate latency CV may be at most this x control's")
    max_error_share: float = Field(0.5, ge=0, le=1, description="above this server_error+timeout+connection_error share the run is invalid")
    equivalence_margin: float | None = Field(None, gt=0, le=10, description="TOST margin on the latency ratio (default: latency_margin)")
    alpha: float = Field(0.05, gt=0, lt=0.5)
    power: float = Field(0.8, gt=0, lt=1)
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000)


class DecisionOverrides(Strict):
    """Thresholds to change when re-evaluating a finished run (unset fields keep the config's)."""

    success_margin: float | None = Field(None, ge=0, le=1)
    latency_margin: float | None = Field(None, ge=0, le=10)
    backend_share_min: float | None = Field(None, ge=0, le=1)
    expected_backend: str | None = None
    max_cv_ratio: float | None = Field(None, gt=0)
    max_error_share: float | None = Field(None, ge=0, le=1)
    alpha: float | None = Field(None, gt=0, lt=0.5)
    bootstrap_resamples: int | None = Field(None, ge=100, le=100_000)

    def apply(self, rule: DecisionRule) -> DecisionRule:
        return rule.model_copy(update=self.model_dump(exclude_none=True))


class ExperimentConfig(Strict):
    name: Name
    description: str = ""
    arms: list[Arm] = Field(min_length=2, max_length=8)
    workload: Workload = Field(default_factory=Workload)
    phases: list[Phase] = Field(default_factory=lambda: list(ALL_PHASES))
    decision: DecisionRule = Field(default_factory=DecisionRule)
    store: str = Field("runs", description="run store root: a directory (relative to the working directory)")
    server_start_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _roles(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        controls = [a.name for a in self.arms if a.role == "control"]
        if len(controls) != 1:
            raise ValueError(f"exactly one arm must have role 'control', found {len(controls)}: {controls}")
        return self

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


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid experiment config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/local.yaml for the known fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


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
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the file: {err}") from None
    return parse_config(data, str(p))


def apply_overrides(cfg: ExperimentConfig, section: str, **values: object) -> ExperimentConfig:
    """A copy of cfg with fields of one section replaced (None values are ignored), re-validated."""
    data = cfg.model_dump()
    data[section] = {**data[section], **{k: v for k, v in values.items() if v is not None}}
    return parse_config(data, f"{section} overrides")
