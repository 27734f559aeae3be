"""One generic registry, and the strategy registry built on it.

Strategies come from the entry-point group ``layerdecode.strategies`` (the built-ins are
declared there too), discovered once, on first use, never at import time; code can also
register with ``@register_strategy("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")

ENTRY_POINT_GROUP = "layerdecode.strategies"

# Used only when layerdecode runs from a source tree that was never installed, so that
# its package metadata (and the entry points declared in pyproject.toml) are missing.
_BUILTIN_ENTRY_POINTS = {
    "final": "layerdecode.strategies.final:FinalStrategy",
    "fixed": "layerdecode.strategies.fixed:FixedStrategy",
    "dola": "layerdecode.strategies.dola:DoLaStrategy",
    "confident": "layerdecode.strategies.confident:ConfidentStrategy",
    "sled": "layerdecode.strategies.sled:SledStrategy",
}


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """Names -> objects of one kind, with type checks, clash errors and did-you-mean."""

    def __init__(
        self,
        kind: str,
        base: type | None = None,
        discover: Callable[[Registry[T]], None] | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self._items: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._discover = discover
        self._discovered = discover is None

    def register(self, name: str, obj: T, *, source: str | None = None) -> T:
        if not isinstance(name, str) or not name or name.strip() != name:
            raise ConfigError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise ConfigError(
                f"Cannot register {self.kind} '{name}': {_origin(obj)} is not a subclass of "
                f"{self.base.__name__}."
            )
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ConfigError(
                f"{self.kind.capitalize()} name '{name}' is claimed twice: by "
                f"{self._sources[name]} and by {source or _origin(obj)}. Rename one of them."
            )
        self._items[name] = obj
        self._sources[name] = source or _origin(obj)
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def _ensure_discovered(self) -> None:
        if not self._discovered:
            self._discovered = True
            self._discover(self)

    def get(self, name: str) -> T:
        self._ensure_discovered()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._items)
        hint = did_you_mean(name, known)
        return f"Unknown {self.kind} '{name}'.{hint} Known: {', '.join(known) or '(none)'}."

    def names(self) -> list[str]:
        self._ensure_discovered()
        return sorted(self._items)

    def source(self, name: str) -> str:
        self.get(name)
        return self._sources[name]

    def __contains__(self, name: object) -> bool:
        self._ensure_discovered()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _discover_strategies(registry: Registry) -> None:
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    have_builtins = any(ep.name in _BUILTIN_ENTRY_POINTS for ep in entry_points)
    if not have_builtins:
        entry_points = [
            metadata.EntryPoint(name, value, ENTRY_POINT_GROUP)
            for name, value in _BUILTIN_ENTRY_POINTS.items()
        ] + entry_points
    for ep in entry_points:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "layerdecode"
        source = f"{ep.value} (entry point of {dist})"
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break every other strategy
            raise ConfigError(
                f"Strategy plugin '{ep.name}' ({ep.value}) failed to import: {e}. "
                f"Fix or uninstall the package '{dist}'."
            ) from e
        registry.register(ep.name, obj, source=source)


def _make_strategy_registry() -> Registry:
    from .strategy import Strategy

    return Registry("strategy", base=Strategy, discover=_discover_strategies)


_STRATEGIES: Registry | None = None


def strategy_registry() -> Registry:
    """The process-wide strategy registry (created on first use)."""
    global _STRATEGIES
    if _STRATEGIES is None:
        _STRATEGIES = _make_strategy_registry()
    return _STRATEGIES


def reset_strategy_registry() -> None:
    """Forget every registration; the next use discovers entry points again (for tests)."""
    global _STRATEGIES
    _STRATEGIES = None


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_strategy("mine")`` makes ``get_strategy("mine")`` work."""

    def wrap(cls: type) -> type:
        strategy_registry().register(name, cls)
        if not getattr(cls, "name", ""):
            cls.name = name
        return cls

    return wrap


def get_strategy_class(name: str) -> type:
    return strategy_registry().get(name)


def get_strategy(name: str, **params: Any):
    """An instance of the strategy registered as ``name``, with validated ``params``."""
    return get_strategy_class(name)(**params)


def list_strategies() -> list[str]:
    return strategy_registry().names()
