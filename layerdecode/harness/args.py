"""``model_args`` of the lm-eval model -> validated settings and strategy params.

lm-eval hands ``--model_args`` over as ``key=value`` pairs split on commas, so a list
value (DoLa's ``layers``) is written with colons: ``layers=16:18:20``. A real list (from
lm-eval's JSON or bracket form, or a Python dict) is accepted as it is. Any key that is not
one of the harness settings below must be a parameter of the chosen strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layerdecode.errors import ConfigError, did_you_mean

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_TOKENS = 8192  # as mlx_lm.evaluate: generation cap and context length for scoring
DEFAULT_SCORE_CHUNK = 64
DEFAULT_MASKED_LOGPROB = -1000.0

SETTINGS = {
    "model": "model name (layerdecode models list), mlx-lm directory, .gguf file or Hub repo",
    "strategy": "strategy or preset name, or a preset YAML path (default final)",
    "dtype": "float32, bfloat16, float16 or quantized (default: layerdecode's for this machine)",
    "batch_size": f"prompts generated or sequences scored together (default {DEFAULT_BATCH_SIZE})",
    "max_tokens": "generation cap over every task's max_gen_toks, and the longest scored "
    f"context (default: the task's max_gen_toks; {DEFAULT_MAX_TOKENS} for the context)",
    "add_special_tokens": "let the tokenizer add its special tokens (default: only when it "
    "has no chat template, as mlx_lm.evaluate)",
    "masked_logprob": "log-probability given to a token the strategy masks out (-inf logit, "
    f"DoLa's plausibility filter); default {DEFAULT_MASKED_LOGPROB}, -inf keeps it",
    "score_chunk": "scored positions decoded together through the strategy's exits "
    f"(default {DEFAULT_SCORE_CHUNK}); bounds the memory of loglikelihood requests",
}
# lm-eval passes these to every model; they mean nothing on MLX.
IGNORED = ("device", "max_batch_size", "trust_remote_code")


@dataclass(frozen=True)
class HarnessArgs:
    """The lm-eval model's settings, checked."""

    model: str | None = None
    strategy: str = "final"
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: int | None = None
    add_special_tokens: bool | None = None
    masked_logprob: float = DEFAULT_MASKED_LOGPROB
    score_chunk: int = DEFAULT_SCORE_CHUNK


def parse_model_args(values: Mapping[str, Any]) -> HarnessArgs:
    """Split ``values`` into harness settings and strategy params; one-line errors."""
    values = {k: v for k, v in values.items() if k not in IGNORED}
    strategy = values.pop("strategy", None) or "final"
    if not isinstance(strategy, str):
        raise ConfigError(f"model_args strategy must be a name, got {strategy!r}.")
    settings = {k: values.pop(k) for k in list(values) if k in SETTINGS}
    known_params = _strategy_params(strategy)
    unknown = [k for k in values if k not in known_params]
    if unknown:
        valid = sorted(SETTINGS) + [f"{p} ({strategy})" for p in known_params]
        hint = did_you_mean(unknown[0], [*SETTINGS, *known_params])
        raise ConfigError(
            f"Unknown model_args {', '.join(unknown)} for the layerdecode model.{hint} "
            f"Valid: {', '.join(valid)}."
        )
    params = {k: _param_value(k, v) for k, v in values.items()}
    model = settings.get("model")
    return HarnessArgs(
        model=str(model) if model is not None else None,
        strategy=strategy,
        params=params,
        dtype=_optional_str("dtype", settings.get("dtype")),
        batch_size=_positive_int("batch_size", settings.get("batch_size"), DEFAULT_BATCH_SIZE),
        max_tokens=_positive_int("max_tokens", settings.get("max_tokens"), None),
        add_special_tokens=_optional_bool("add_special_tokens", settings.get("add_special_tokens")),
        masked_logprob=_masked(settings.get("masked_logprob")),
        score_chunk=_positive_int("score_chunk", settings.get("score_chunk"), DEFAULT_SCORE_CHUNK),
    )


def _strategy_params(strategy: str) -> list[str]:
    from layerdecode.config import describe_strategy

    return [row["name"] for row in describe_strategy(strategy)["params"]]


def _param_value(name: str, value: Any) -> Any:
    """``16:18:20`` -> ``[16, 18, 20]``; numbers in a colon list become numbers."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and ":" in value:
        return [_scalar(part) for part in value.split(":") if part.strip()]
    return value


def _scalar(text: str) -> Any:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _optional_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"model_args {name} must be a name, got {value!r}.")
    return value


def _positive_int(name: str, value: Any, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model_args {name} must be a positive integer, got {value!r}.")
    return value


def _optional_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"model_args {name} must be true or false, got {value!r}.")


def _masked(value: Any) -> float:
    if value is None:
        return DEFAULT_MASKED_LOGPROB
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or math.isnan(number) or number > 0:
        raise ConfigError(
            f"model_args masked_logprob must be a number <= 0 or -inf, got {value!r}."
        )
    return number
