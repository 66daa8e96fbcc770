"""The generation parameters a causal LM's MLflow signature declares, and their limits.

MLflow passes ``params`` to ``predict`` only when the signature has a params schema (otherwise it drops them
with a warning, and every answer was 16 tokens long). :data:`PARAMS` is that schema; MLflow fills in the
defaults and checks the types, :func:`parse` checks the ranges and the serving process's budget
(``max_new_tokens_limit``) and refuses anything else in one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mlflow.types import ParamSchema, ParamSpec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import ConfigError, validation_problems

DEFAULT_MAX_NEW_TOKENS = 16
PARAMS = ParamSchema([
    ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
    ParamSpec("temperature", "double", 1.0),
    ParamSpec("top_p", "double", 1.0),
    ParamSpec("do_sample", "boolean", False),
])
SAMPLING = ("do_sample", "temperature", "top_p")


class GenerationParams(BaseModel):
    """One request's decoding settings (Hugging Face ``generate`` names and meanings)."""

    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, description="Tokens to generate per text at most.")
    temperature: float = Field(1.0, gt=0, le=100, description="Logits are divided by this before sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens whose "
                                                      "probability sums to at least top_p.")
    do_sample: bool = Field(False, description="Sample instead of decoding greedily.")


def parse(params: dict[str, Any] | None, limit: int) -> GenerationParams:
    """``params`` as :class:`GenerationParams`, within ``limit`` new tokens; one-line :class:`ConfigError` if not."""
    try:
        parsed = GenerationParams.model_validate(params or {})
    except ValidationError as exc:
        raise ConfigError(f"predict params: {validation_problems(exc, model=GenerationParams)}") from None
    if parsed.max_new_tokens > limit:
        raise ConfigError(f"predict params: max_new_tokens={parsed.max_new_tokens} is over this server's limit of "
                          f"{limit}; ask for fewer, or raise KILN_MAX_NEW_TOKENS_LIMIT where the model is served")
    return parsed


def generate_kwargs(predict: Callable[..., Any], params: GenerationParams) -> dict[str, Any]:
    """Keyword arguments for ``predict`` (a Predictor's): max_new_tokens, plus the sampling settings when asked
    for sampling and ``predict`` takes them; sampling where it cannot be done is refused, not silently greedy."""
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens}
    if not params.do_sample:
        return kwargs
    accepted = inspect.signature(predict).parameters
    if not all(name in accepted for name in SAMPLING):
        raise ConfigError("predict params: do_sample=true, but this model's engine decodes greedily only; "
                          "send do_sample=false (temperature and top_p then do not apply)")
    return kwargs | params.model_dump(include=set(SAMPLING))
