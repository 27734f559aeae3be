"""The strategy registry: decorator, entry points, clashes, did-you-mean."""

from __future__ import annotations

from importlib import metadata

import pytest

from layerdecode import registry
from layerdecode.errors import ConfigError
from layerdecode.registry import (
    Registry,
    get_strategy,
    list_strategies,
    register_strategy,
    strategy_registry,
)
from layerdecode.strategy import Strategy

# Each test starts from, and leaves behind, a registry that knows only the entry points.
pytestmark = pytest.mark.usefixtures("fresh_registry")


class PluginStrategy(Strategy):
    name = "plugin-one"

    def select(self, view):  # pragma: no cover - never run
        raise NotImplementedError


def test_builtins_are_discovered_through_entry_points():
    assert {"final", "fixed", "dola", "confident"} <= set(list_strategies())
    assert "entry point of layerdecode" in strategy_registry().source("confident")


def test_decorator_registers_in_process():
    @register_strategy("mine")
    class Mine(Strategy):
        def select(self, view):  # pragma: no cover
            raise NotImplementedError

    assert isinstance(get_strategy("mine"), Mine)
    assert Mine.name == "mine"
    assert "mine" in list_strategies()


def test_clash_names_both_sides():
    class A(Strategy):
        pass

    class B(Strategy):
        pass

    register_strategy("twin")(A)
    with pytest.raises(ConfigError) as err:
        register_strategy("twin")(B)
    message = str(err.value)
    assert "'twin' is claimed twice" in message
    assert "test_clash_names_both_sides.<locals>.A" in message
    assert "test_clash_names_both_sides.<locals>.B" in message


def test_clash_with_a_builtin():
    class Impostor(Strategy):
        pass

    list_strategies()
    with pytest.raises(ConfigError, match="layerdecode.strategies.final:FinalStrategy"):
        register_strategy("final")(Impostor)


def test_unknown_name_suggests():
    with pytest.raises(ConfigError) as err:
        get_strategy("confidant")
    assert "Unknown strategy 'confidant'. Did you mean 'confident'?" in str(err.value)
    assert "Known: confident, dola, final, fixed" in str(err.value)


def test_only_strategies_can_register():
    with pytest.raises(ConfigError, match="is not a subclass of Strategy"):
        register_strategy("nope")(dict)


def fake_entry_points(*extra):
    real = list(metadata.entry_points(group=registry.ENTRY_POINT_GROUP))

    def entry_points(group):
        assert group == registry.ENTRY_POINT_GROUP
        return real + list(extra)

    return entry_points


def test_plugins_are_discovered_once_lazily(monkeypatch):
    calls = []
    ep = metadata.EntryPoint("plugin-one", f"{__name__}:PluginStrategy", registry.ENTRY_POINT_GROUP)
    finder = fake_entry_points(ep)

    def counting(group):
        calls.append(group)
        return finder(group)

    monkeypatch.setattr(registry.metadata, "entry_points", counting)
    assert calls == []  # nothing happens before first use
    assert "plugin-one" in list_strategies()
    assert isinstance(get_strategy("plugin-one"), PluginStrategy)
    list_strategies()
    assert len(calls) == 1


def test_broken_plugin_is_named(monkeypatch):
    ep = metadata.EntryPoint("broken", "no_such_module_xyz:Thing", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points(ep))
    with pytest.raises(ConfigError, match="Strategy plugin 'broken' .* failed to import"):
        list_strategies()


def test_plugin_clashing_with_builtin(monkeypatch):
    ep = metadata.EntryPoint("final", f"{__name__}:PluginStrategy", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points(ep))
    with pytest.raises(ConfigError, match="'final' is claimed twice"):
        list_strategies()


def test_generic_registry_without_discovery():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    assert reg.get("a") == 1
    with pytest.raises(ConfigError, match="Unknown widget 'b'"):
        reg.get("b")
    with pytest.raises(ConfigError, match="non-empty string"):
        reg.register("", 2)
