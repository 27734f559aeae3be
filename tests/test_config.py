"""YAML presets: shipped ones validate; bad files give one clear line."""

from __future__ import annotations

import pytest

from layerdecode.config import list_presets, read_preset, resolve_strategy, shipped_presets
from layerdecode.errors import ConfigError
from layerdecode.strategies.confident import ConfidentStrategy
from layerdecode.strategies.dola import DoLaStrategy


def test_shipped_presets_validate():
    presets = {p.name: p for p in list_presets()}
    assert {"final", "confident", "dola", "dola-low", "confident-half"} <= set(presets)
    for name, path in shipped_presets().items():
        assert presets[name].name == path.stem  # file name and preset name agree
    assert presets["dola"].generation.repetition_penalty == 1.2
    assert presets["confident"].params["window"] == 10


def test_resolve_preset_strategy_and_file(tmp_path):
    resolved = resolve_strategy("dola")
    assert isinstance(resolved.strategy, DoLaStrategy)
    assert resolved.generation.repetition_penalty == 1.2
    resolved = resolve_strategy("confident", {"window": 4})
    assert resolved.strategy.params.window == 4
    resolved = resolve_strategy("fixed", {"layer": 3})
    assert resolved.strategy.params.layer == 3 and resolved.preset is None
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstrategy: confident\nparams: {window: 3, method: trough-m1}\n")
    resolved = resolve_strategy(str(path))
    assert isinstance(resolved.strategy, ConfidentStrategy)
    assert resolved.strategy.params.method == "trough-m1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "a preset must be a YAML mapping"),
        ("name: x\nstrategy: confidant\n", "Unknown strategy 'confidant'. Did you mean"),
        ("name: x\nstrategy: confident\nparams: {window: 0}\n", "window"),
        ("name: x\nstrategy: confident\nparams: {windows: 3}\n", "unknown parameter 'windows'"),
        ("name: x\nstrategy: final\ncolour: red\n", "unknown key 'colour'"),
        ("strategy: final\n", "missing key 'name'"),
        ("name: x\nstrategy: final\ngeneration: {temp: -1}\n", "generation.temp"),
        ("name: x\nstrategy: [final\n", "not valid YAML at line"),
        ("name: x\nstrategy: final\nparams: !!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_bad_preset_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_preset(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_spec_lists_strategies_and_presets():
    with pytest.raises(ConfigError) as err:
        resolve_strategy("dolla")
    message = str(err.value)
    assert "Unknown strategy or preset 'dolla'. Did you mean 'dola'" in message
    assert "dola-low" in message


def test_missing_preset_file():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_strategy("nowhere/mine.yaml")


# -- one clash policy for strategies and presets -------------------------------------------


def test_shipped_presets_that_shadow_their_strategy_say_so():
    from layerdecode.config import describe_strategies

    rows = {(r["name"], r["kind"]): r for r in describe_strategies()}
    for name in ("final", "confident", "dola"):
        assert rows[(name, "preset")]["shadows"] is True
        assert rows[(name, "built-in")]["shadows"] is False
    assert rows[("dola-low", "preset")]["shadows"] is False
    # The name means the preset; the bare strategy is one call away.
    from layerdecode.registry import get_strategy

    assert resolve_strategy("dola").preset.name == "dola"
    assert get_strategy("dola").params == resolve_strategy("dola").strategy.params


def test_plugin_strategy_named_like_a_preset_is_an_error(fresh_registry):
    from layerdecode.registry import register_strategy
    from layerdecode.strategies.final import FinalStrategy

    class Mine(FinalStrategy):
        name = "confident-half"

    register_strategy("confident-half")(Mine)
    with pytest.raises(ConfigError) as err:
        resolve_strategy("confident-half")
    message = str(err.value)
    assert "'confident-half' is claimed twice" in message
    assert "Mine" in message and "confident-half.yaml" in message


def test_preset_named_like_a_strategy_must_declare_it(tmp_path, monkeypatch, fresh_registry):
    import layerdecode.config as config

    folder = tmp_path / "strategies"
    folder.mkdir()
    (folder / "fixed.yaml").write_text("name: fixed\nstrategy: fixed\nparams: {layer: 1}\n")
    monkeypatch.setattr(config, "data_dir", lambda kind: folder)
    config.reset_preset_registry()
    with pytest.raises(ConfigError, match="'fixed' is claimed twice: by strategy .*fixed.yaml"):
        resolve_strategy("final")
    (folder / "fixed.yaml").write_text(
        "name: fixed\nstrategy: fixed\nshadows_strategy: true\nparams: {layer: 1}\n"
    )
    config.reset_preset_registry()
    assert resolve_strategy("fixed").strategy.params.layer == 1


def test_shadowing_is_only_for_the_strategys_own_name(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: mine\nstrategy: fixed\nshadows_strategy: true\n")
    with pytest.raises(ConfigError, match="shadows_strategy is for a preset named like its own"):
        read_preset(path)


def test_describe_strategy_of_preset_and_strategy():
    from layerdecode.config import describe_strategy

    dola = describe_strategy("dola")
    assert dola["strategy"] == "dola" and dola["preset"]["generation"] == {
        "repetition_penalty": 1.2
    }
    assert {row["name"] for row in dola["params"]} >= {"layers"}
    fixed = describe_strategy("fixed")
    assert "preset" not in fixed and fixed["params"][0]["name"] == "layer"
    with pytest.raises(ConfigError, match="Did you mean 'confident'"):
        describe_strategy("confidnt")
