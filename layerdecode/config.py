"""YAML presets -> validated strategies.

A preset is a flat, declarative YAML mapping (read with ``yaml.safe_load`` only)::

    name: dola
    strategy: dola
    description: DoLa over the upper half of the layers, as HF recommends.
    params: {layers: high}
    generation: {repetition_penalty: 1.2}

Presets ship in the top-level ``strategies/`` folder; users can pass their own file
anywhere a preset name is accepted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .registry import get_strategy_class, list_strategies
from .resources import data_dir
from .strategy import Strategy


class GenerationDefaults(BaseModel):
    """Generation options a preset may set; explicit user options override them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    temp: float | None = Field(None, ge=0.0, description="Sampling temperature (0: greedy).")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Min-p sampling threshold.")
    top_k: int | None = Field(None, ge=0, description="Top-k sampling (0: off).")
    repetition_penalty: float | None = Field(None, gt=0.0, description="Repetition penalty.")
    repetition_context_size: int | None = Field(
        None, ge=1, description="Tokens the repetition penalty looks back over."
    )
    max_tokens: int | None = Field(None, ge=1, description="Maximum tokens to generate.")


class Preset(BaseModel):
    """A named strategy configuration."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1)
    strategy: str = Field(min_length=1)
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)


@dataclass(frozen=True)
class ResolvedStrategy:
    """A ready strategy, the preset it came from (if any) and its generation defaults."""

    strategy: Strategy
    generation: GenerationDefaults
    preset: Preset | None = None
    source: str = ""


def _one_line(error: ValidationError, where: str) -> str:
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return f"{where}: " + "; ".join(parts)


def read_preset(path: str | Path) -> Preset:
    """Read and validate one preset file (schema and strategy params)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot read preset file {path}: {e.strerror or e}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a preset must be a YAML mapping with keys name, strategy, params "
            f"(got {type(data).__name__})."
        )
    try:
        preset = Preset(**data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, str(path))) from None
    except TypeError as e:  # non-string keys
        raise ConfigError(f"{path}: {e}.") from None
    try:
        get_strategy_class(preset.strategy)(**preset.params)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return preset


def shipped_presets() -> dict[str, Path]:
    """Preset name -> file, for the presets shipped with layerdecode."""
    folder = data_dir("strategies")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def list_presets() -> list[Preset]:
    return [read_preset(path) for path in shipped_presets().values()]


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file()


def resolve_strategy(
    spec: str | Strategy | None = None, params: dict[str, Any] | None = None
) -> ResolvedStrategy:
    """Turn a strategy spec into a ready strategy.

    ``spec`` is a :class:`Strategy` instance, a YAML preset file, a shipped preset name or
    a registered strategy name (in that order of lookup); ``None`` means ``final``.
    ``params`` override the preset's params (or are the strategy's params).
    """
    params = dict(params or {})
    if spec is None:
        spec = "final"
    if isinstance(spec, ResolvedStrategy) and not params:
        return spec
    if isinstance(spec, Strategy):
        if params:
            raise ConfigError("Pass params when building the strategy object, not beside it.")
        return ResolvedStrategy(spec, GenerationDefaults(), None, type(spec).__name__)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"A strategy must be a name, a preset or a YAML file, got {spec!r}.")
    if _looks_like_path(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"Preset file {spec} does not exist.")
        preset, source = read_preset(spec), spec
    elif spec in shipped_presets():
        preset, source = read_preset(shipped_presets()[spec]), f"preset {spec}"
    elif spec in list_strategies():
        cls = get_strategy_class(spec)
        return ResolvedStrategy(cls(**params), GenerationDefaults(), None, f"strategy {spec}")
    else:
        known = sorted(set(list_strategies()) | set(shipped_presets()))
        close = difflib.get_close_matches(spec, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown strategy or preset '{spec}'.{hint} Known: {', '.join(known)}. "
            "A YAML preset file path works too."
        )
    strategy = get_strategy_class(preset.strategy)(**{**preset.params, **params})
    return ResolvedStrategy(strategy, preset.generation, preset, source)
