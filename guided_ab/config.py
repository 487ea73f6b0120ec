"""Experiment configuration: the pydantic models every phase reads, and the YAML loader.

A config is the pre-registration of an experiment: arms, workload, phases and the decision
rule are fixed here before any request is sent. Unknown keys are errors everywhere, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from guided_ab.errors import ConfigError as ConfigError  # re-exported: `guided_ab.config.ConfigError` is its old home

Backend = Literal["auto", "guidance", "xgrammar", "outlines", "lm-format-enforcer"]
TargetKind = Literal["local", "modal", "external"]
Role = Literal["control", "candidate"]
Phase = Literal["deploy", "observe", "ab", "evaluate", "decide"]
ALL_PHASES: tuple[Phase, ...] = ("deploy", "observe", "ab", "evaluate", "decide")

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,38}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModalSettings(Strict):
    """How a `modal` arm is served (see modal_apps/vllm_arm.py)."""

    gpu: str = "H100"
    gpu_count: int = Field(default=1, ge=1, le=8)
    gpu_cost_per_hour: float = Field(default=3.95, ge=0, description="USD per GPU-hour, for the cost report")
    startup_timeout_s: int = Field(default=1800, ge=60)
    scaledown_window_s: int = Field(default=300, ge=2)
    max_concurrent_inputs: int = Field(default=32, ge=1)
    max_model_len: int | None = Field(default=None, ge=256)
    revision: str | None = None
    api_key_secret: str = Field(default="guided-ab-api-key", description="modal.Secret holding VLLM_API_KEY")


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

    @model_validator(mode="after")
    def _target_fields(self) -> Arm:
        if self.target == "external" and not self.url:
            raise ValueError("an arm with target 'external' needs 'url' (the endpoint's base URL)")
        if self.target != "external" and self.url:
            raise ValueError(f"'url' is only for target 'external' (this arm's target is '{self.target}')")
        return self


class Workload(Strict):
    """What is sent: which schemas, how many, in which order, with which sampling settings."""

    suite: str = Field(default="functions", description="'functions' (built in) or a JSONSchemaBench-style directory")
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

    @field_validator("prompt_template")
    @classmethod
    def _template_has_schema(cls, v: str) -> str:
        if "{schema}" not in v:
            raise ValueError("prompt_template must contain '{schema}' (and may contain '{prompt}')")
        return v


class DecisionRule(Strict):
    """Pre-registered thresholds. Defaults are the seed's criteria (auto-mode testing guide)."""

    success_margin: float = Field(default=0.05, ge=0, le=1, description="candidate may be this much less successful")
    latency_margin: float = Field(default=0.10, ge=0, le=10, description="candidate p50 may be this much slower (ratio-1)")
    backend_share_min: float = Field(default=0.90, ge=0, le=1, description="expected share of the control's backend under auto")
    expected_backend: str = Field(default="guidance", description="backend the candidate is expected to pick mostly")
    max_cv_ratio: float = Field(default=1.5, gt=0, description="candidate latency CV may be at most this x control's")
    max_error_share: float = Field(default=0.5, ge=0, le=1, description="above this server_error+timeout+connection_error share the run is invalid")
    equivalence_margin: float | None = Field(default=None, gt=0, le=10, description="TOST margin on the latency ratio (default: latency_margin)")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0, lt=1)
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100_000)


class _Overrides(Strict):
    """The base of `DecisionOverrides`: how a set of overrides applies to a rule."""

    def apply(self, rule: DecisionRule) -> DecisionRule:
        return rule.model_copy(update=self.model_dump(exclude_none=True))


def _all_optional(model: type[BaseModel]) -> dict[str, Any]:
    """`create_model` field definitions: every field of `model`, optional with None (= unset) as its
    default, keeping its bounds and description."""
    return {name: (Optional[f.annotation], FieldInfo.merge_field_infos(f, default=None))  # noqa: UP045 (a runtime type)
            for name, f in model.model_fields.items()}


# Derived from DecisionRule, so the overridable thresholds cannot drift from the rule's (every field,
# same bounds and descriptions). A real pydantic model class, importable here: Prefect renders it as
# the `thresholds` parameter form. Type checkers cannot follow create_model: they see a stand-in
# that takes the thresholds as keywords.
if TYPE_CHECKING:
    class DecisionOverrides(_Overrides):
        def __init__(self, **thresholds: Any) -> None: ...
else:
    DecisionOverrides = create_model(
        "DecisionOverrides", __base__=_Overrides, __module__=__name__, **_all_optional(DecisionRule),
        __doc__="Thresholds to change when re-evaluating a finished run (unset fields keep the config's).",
    )


class ExperimentConfig(Strict):
    name: Name
    description: str = ""
    arms: list[Arm] = Field(min_length=2, max_length=8)
    workload: Workload = Field(default_factory=lambda: Workload())
    phases: list[Phase] = Field(default_factory=lambda: list(ALL_PHASES))
    decision: DecisionRule = Field(default_factory=lambda: DecisionRule())
    store: str = Field(default="runs", description="run store root: a directory (relative to the working directory)")
    server_start_timeout_s: float = Field(default=600.0, gt=0)

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
