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
