"""YAML presets -> validated strategies, and the one place a strategy spec is resolved.

A preset is a flat, declarative YAML mapping (read with ``yaml.safe_load`` only)::

    name: dola
    strategy: dola
    shadows_strategy: true
    description: DoLa over the upper half of the layers, as HF recommends.
    params: {layers: high}
    generation: {repetition_penalty: 1.2}

Presets ship in the top-level ``strategies/`` folder; users can pass their own file
anywhere a preset name is accepted. Strategies and presets are two registries under one
clash policy: a preset may carry the name of a strategy only when it is a preset OF that
strategy and says so (``shadows_strategy: true``); then the name means the preset wherever
a spec is resolved (``get_strategy(name)`` still gives the bare strategy). Any other shared
name is an error naming both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, did_you_mean, one_line_error
from .options import GenerationOptions
from .registry import Registry, get_strategy_class, list_strategies, strategy_registry
from .resources import data_dir
from .strategy import Strategy


class Preset(BaseModel):
    """A named strategy configuration."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1)
    strategy: str = Field(min_length=1)
    shadows_strategy: bool = Field(
        False,
        description="The preset has the name of its own strategy and stands for it by name.",
    )
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)


@dataclass(frozen=True)
class ResolvedStrategy:
    """A ready strategy, the preset it came from (if any) and its generation defaults."""

    strategy: Strategy
    generation: GenerationOptions
    preset: Preset | None = None
    source: str = ""

    @property
    def label(self) -> str:
        """The name users gave: the preset's name, else the strategy's."""
        return self.preset.name if self.preset is not None else self.strategy.name

    def info(self) -> dict[str, Any]:
        """``{"name", "params"[, "preset"]}``: what results record about the strategy."""
        out: dict[str, Any] = {
            "name": self.strategy.name,
            "params": self.strategy.resolved_params(),
        }
        if self.preset is not None:
            out["preset"] = self.preset.name
        return out


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
        raise ConfigError(one_line_error(e, str(path))) from None
    except TypeError as e:  # non-string keys
        raise ConfigError(f"{path}: {e}.") from None
    if preset.shadows_strategy and preset.strategy != preset.name:
        raise ConfigError(
            f"{path}: shadows_strategy is for a preset named like its own strategy, but "
            f"'{preset.name}' is a preset of '{preset.strategy}'. Remove shadows_strategy."
        )
    try:
        get_strategy_class(preset.strategy)(**preset.params)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return preset


def _discover_presets(registry: Registry) -> None:
    folder = data_dir("strategies")
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
        registry.register(path.stem, path, source=str(path))
    check_name_clashes(registry)


def check_name_clashes(presets: Registry) -> None:
    """Refuse a name shared by a strategy and a preset unless the preset declares it."""
    for name in presets.names():
        if name in strategy_registry():
            _check_clash(read_preset(presets.get(name)), presets.source(name))


def _check_clash(preset: Preset, source: str) -> None:
    strategies = strategy_registry()
    if preset.name in strategies and not preset.shadows_strategy:
        raise ConfigError(
            f"The name '{preset.name}' is claimed twice: by strategy "
            f"{strategies.source(preset.name)} and by preset {source}. Rename one of them "
            "(a preset of that very strategy may keep the name with 'shadows_strategy: true')."
        )


_PRESETS: Registry | None = None


def preset_registry() -> Registry:
    """The shipped presets by name (discovered on first use, checked against strategies)."""
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = Registry("preset", discover=_discover_presets)
    return _PRESETS


def reset_preset_registry() -> None:
    """Forget the presets; the next use reads the folder and checks clashes again."""
    global _PRESETS
    _PRESETS = None


def shipped_presets() -> dict[str, Path]:
    """Preset name -> file, for the presets shipped with layerdecode."""
    registry = preset_registry()
    return {name: registry.get(name) for name in registry.names()}


def list_presets() -> list[Preset]:
    """Every shipped preset, validated, by name."""
    return [read_preset(path) for path in shipped_presets().values()]


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file()


def find_preset(spec: str) -> tuple[Preset, str] | None:
    """The preset a name or YAML path stands for, with its source; ``None`` for neither."""
    if _looks_like_path(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"Preset file {spec} does not exist.")
        return read_preset(spec), spec
    presets = preset_registry()
    if spec in presets:
        preset = read_preset(presets.get(spec))
        _check_clash(preset, presets.source(spec))  # also a strategy registered since discovery
        return preset, f"preset {spec}"
    return None


def resolve_strategy(
    spec: str | Strategy | ResolvedStrategy | None = None, params: dict[str, Any] | None = None
) -> ResolvedStrategy:
    """Turn a strategy spec into a ready strategy, once.

    ``spec`` is a :class:`Strategy` instance, a YAML preset file, a shipped preset name or
    a registered strategy name (in that order of lookup); ``None`` means ``final``.
    ``params`` override the preset's params (or are the strategy's params). A
    :class:`ResolvedStrategy` is returned as it is.
    """
    params = dict(params or {})
    if spec is None:
        spec = "final"
    if isinstance(spec, ResolvedStrategy):
        if params:
            raise ConfigError("Pass params when resolving the strategy, not beside it.")
        return spec
    if isinstance(spec, Strategy):
        if params:
            raise ConfigError("Pass params when building the strategy object, not beside it.")
        return ResolvedStrategy(spec, GenerationOptions(), None, type(spec).__name__)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"A strategy must be a name, a preset or a YAML file, got {spec!r}.")
    found = find_preset(spec)
    if found is not None:
        preset, source = found
        strategy = get_strategy_class(preset.strategy)(**{**preset.params, **params})
        return ResolvedStrategy(strategy, preset.generation, preset, source)
    if spec in list_strategies():
        strategy = get_strategy_class(spec)(**params)
        return ResolvedStrategy(strategy, GenerationOptions(), None, f"strategy {spec}")
    known = sorted(set(list_strategies()) | set(preset_registry().names()))
    raise ConfigError(
        f"Unknown strategy or preset '{spec}'.{did_you_mean(spec, known)} "
        f"Known: {', '.join(known)}. A YAML preset file path works too."
    )


def describe_strategies() -> list[dict[str, Any]]:
    """Every strategy and shipped preset as a row: name, kind, strategy, description, source.

    ``kind`` is ``built-in``, ``plugin`` or ``preset``; a preset that shadows its strategy's
    name has ``shadows: true`` (the name means the preset when a spec is resolved).
    """
    registry = strategy_registry()
    rows = []
    for name in list_strategies():
        source = registry.source(name)
        rows.append(
            {
                "name": name,
                "kind": "built-in" if source.startswith("layerdecode.") else "plugin",
                "strategy": name,
                "description": get_strategy_class(name).description,
                "source": source,
                "shadows": False,
            }
        )
    for path in shipped_presets().values():
        preset = read_preset(path)
        rows.append(
            {
                "name": preset.name,
                "kind": "preset",
                "strategy": preset.strategy,
                "description": preset.description,
                "source": str(path),
                "shadows": preset.shadows_strategy,
            }
        )
    return rows


def describe_strategy(spec: str) -> dict[str, Any]:
    """A strategy or preset (name or YAML file) with its params' types, defaults, descriptions.

    Keys: ``name``, ``strategy``, ``description``, ``source``, ``params`` (rows of
    :meth:`Strategy.describe_params`) and, for a preset, ``preset`` (its name,
    description, params and generation defaults).
    """
    found = (
        find_preset(spec) if spec not in list_strategies() or spec in preset_registry() else None
    )
    if found is None and spec not in list_strategies():
        resolve_strategy(spec)  # raises the did-you-mean error
    preset = found[0] if found is not None else None
    strategy_name = preset.strategy if preset is not None else spec
    cls = get_strategy_class(strategy_name)
    data: dict[str, Any] = {
        "name": spec,
        "strategy": strategy_name,
        "description": cls.description,
        "source": strategy_registry().source(strategy_name),
        "params": cls.describe_params(),
    }
    if preset is not None:
        data["preset"] = {
            "name": preset.name,
            "description": preset.description,
            "params": preset.params,
            "generation": preset.generation.set_values(),
            "shadows": preset.shadows_strategy,
        }
    return data
