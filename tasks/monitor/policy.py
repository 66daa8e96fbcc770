"""A monitoring policy: what "healthy" means for a served champion, and what each kind of breach sets off.

A policy (YAML, like the gate policy and the rollout spec; the shipped default is
``tasks/presets/monitor-default.yaml``)::

    min_requests: 200                 # fewer requests in the window: inconclusive, never healthy
    slo: {max_error_rate: 0.01, max_p95_ms: 500}
    input_drift: {max_kl: 0.2, min_rows: 50}          # text lengths (the rollout's check)
    content_drift: {max_psi: 0.2, min_tokens: 2000}   # tokens (kiln.tasks.evaluate.content_drift)
    embedding_drift: {}                                # the model's pooled representation
    prediction_drift: {max_kl: 0.2, min_rows: 50}     # predicted-class mix against the reference labels
    quality: {min_accuracy: 0.8, min_feedback: 30}    # delayed labelled feedback
    actions: {slo: [notify, rollback], quality: [notify, retrain], input_drift: [notify]}
    notify_url: https://hooks.example.com/kiln

A section set to ``null`` (or left out, for the drift sections and quality) is not judged. The verdict itself is
:func:`kiln.tasks.monitor.evaluate.evaluate`'s; this module only reads and checks policies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import ConfigError, validation_problems
from kiln.tasks.evaluate.content_drift import ContentDriftConfig
from kiln.tasks.evaluate.embedding_drift import EmbeddingDriftConfig
from kiln.tasks.presets import PRESETS
from kiln.tasks.rollout.drift import reference_file_format
from kiln.yamlfile import read_yaml

DEFAULT_POLICY = PRESETS / "monitor-default.yaml"

BreachKind = Literal["slo", "input_drift", "content_drift", "embedding_drift", "prediction_drift", "quality"]
Action = Literal["notify", "rollback", "retrain"]
BREACH_KINDS: tuple[str, ...] = get_args(BreachKind)
ACTIONS: tuple[str, ...] = get_args(Action)  # also the order in which a verdict lists its actions


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SloPolicy(_Section):
    """Service-level objectives of the served version; ``null`` switches a threshold off."""

    max_error_rate: float | None = Field(0.01, ge=0, le=1, description=(
        "Largest share of requests answered with status >= 500 or not at all."))
    max_p95_ms: float | None = Field(None, gt=0, description=(
        "Largest p95 latency of successful answers, in milliseconds (as the gateway measures it, upstream "
        "included)."))


class InputDriftPolicy(_Section):
    """The rollout's length check on the window's inputs (characters and words) against the reference."""

    max_kl: float = Field(0.2, gt=0, description=(
        "Largest KL divergence of the input lengths from the reference's (Great Expectations' KL check)."))
    min_rows: int = Field(50, ge=1, description="Input rows needed to judge; fewer is inconclusive.")


class PredictionDriftPolicy(_Section):
    """The served version's predicted-class mix against the reference's labels; ``null`` switches a test off."""

    max_kl: float | None = Field(0.2, gt=0, description=(
        "Largest KL divergence of the predicted classes from the reference labels (Great Expectations' KL check, "
        "as the rollout's class check)."))
    max_psi: float | None = Field(None, gt=0, description=(
        "Largest population stability index of the predicted classes against the reference labels."))
    min_rows: int = Field(50, ge=1, description="Predictions needed to judge; fewer is inconclusive.")

    @model_validator(mode="after")
    def _one_test(self) -> PredictionDriftPolicy:
        if self.max_kl is None and self.max_psi is None:
            raise ValueError("set max_kl or max_psi (or prediction_drift: null to switch the check off)")
        return self


class QualityPolicy(_Section):
    """Accuracy on delayed labelled feedback (``POST /feedback`` on the gateway)."""

    min_accuracy: float = Field(..., gt=0, le=1, description="Lowest share of feedback rows predicted right.")
    min_feedback: int = Field(30, ge=1, description="Feedback rows needed to judge; fewer is inconclusive.")


def _default_actions() -> dict[str, list[str]]:
    return {kind: ["notify"] for kind in BREACH_KINDS}


class MonitorPolicy(_Section):
    """What a healthy champion looks like, and what each kind of breach does."""

    min_requests: int = Field(100, ge=1, description=(
        "Requests the window needs before anything about it is healthy; fewer is inconclusive, never healthy."))
    alpha: float = Field(0.05, gt=0, lt=0.5, description=(
        "One-sided error level of the count checks: the error rate fails only when significantly above its "
        "objective, accuracy only when significantly below its minimum (Wilson intervals)."))
    slo: SloPolicy | None = Field(default_factory=SloPolicy, description=(
        "Error rate and latency objectives; null: not judged."))
    reference: str | None = Field(None, description=(
        "Eval file (.csv/.parquet/.jsonl, a 'text' and optionally a 'label' column) the input and prediction drift "
        "compare with; default: the test split of the dataset recorded on the champion."))
    input_drift: InputDriftPolicy | None = Field(default_factory=InputDriftPolicy, description=(
        "The inputs' lengths against the reference; null: not judged."))
    content_drift: ContentDriftConfig | None = Field(None, description=(
        "Token frequencies and unknown-token share against the training split (computed by the monitor flow "
        "with the model's tokenizer); null: not judged."))
    embedding_drift: EmbeddingDriftConfig | None = Field(None, description=(
        "The model's pooled representation against the reference's ({} for the defaults; computed by the monitor "
        "flow with the model); null: not judged."))
    prediction_drift: PredictionDriftPolicy | None = Field(default_factory=PredictionDriftPolicy, description=(
        "The predicted-class mix against the reference labels; null: not judged."))
    quality: QualityPolicy | None = Field(None, description=(
        "Accuracy on delayed labelled feedback; null: not judged."))
    actions: dict[BreachKind, list[Action]] = Field(default_factory=_default_actions, description=(
        "What each kind of breach sets off: notify (webhook + event), rollback (to @previous, through the "
        "promotion path) and/or retrain (on recent feedback plus the training data). A kind not listed does "
        "nothing but show in the verdict."))
    notify_url: str | None = Field(None, description=(
        "Webhook that 'notify' POSTs the verdict to (JSON, signed with X-Kiln-Signature when a secret is set)."))
    notify_timeout_s: float = Field(10.0, gt=0, le=120, description="How long a notification may take.")
    action_timeout_s: float = Field(3600.0, gt=0, description=(
        "An action started longer ago than this and never finished is stale: it no longer blocks a new one."))
    retrain_feedback_days: float = Field(7.0, gt=0, description=(
        "Days of labelled feedback a 'retrain' action adds to the training data."))

    @field_validator("reference")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return reference_file_format(value)

    @field_validator("notify_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value[:80]!r} is not an http(s) URL")
        return value

    def enabled(self) -> list[str]:
        """The breach kinds this policy judges, in the order of :data:`BREACH_KINDS`."""
        return [kind for kind in BREACH_KINDS if getattr(self, kind) is not None]

    def actions_for(self, kinds: list[str]) -> list[str]:
        """The actions ``kinds`` set off, each once, in the order notify, rollback, retrain."""
        wanted = {action for kind in kinds for action in self.actions.get(kind, [])}  # type: ignore[call-overload]
        return [action for action in ACTIONS if action in wanted]


def parse_policy(raw: Any, where: str = "monitor policy") -> MonitorPolicy:
    """A policy from a mapping; every problem is one :class:`ConfigError` naming ``where``, the field and the fix."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of sections (min_requests, slo, input_drift, actions, ...)")
    try:
        return MonitorPolicy.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where} is invalid: {validation_problems(exc, 'policy', model=MonitorPolicy)}") from exc


def load_policy(path: Path | None) -> MonitorPolicy:
    """Read and validate a monitoring policy (default: ``tasks/presets/monitor-default.yaml``).

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or a key or value is wrong (one line).
    """
    path = Path(path) if path is not None else DEFAULT_POLICY
    where = f"monitor policy {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; pass an existing YAML file (see {DEFAULT_POLICY.name})")
    return parse_policy(read_yaml(path, where), where)
