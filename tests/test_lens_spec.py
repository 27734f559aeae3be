"""Layer selections for the lens: parse once, resolve against any depth; inspect_generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from layerdecode import lens
from layerdecode.errors import ConfigError
from layerdecode.testing import tiny_model


class _Tokenizer:
    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


@pytest.mark.parametrize(
    ("spec", "rows"),
    [
        ("20:30", list(range(20, 30))),
        ("-8:", list(range(22, 30))),
        ("5", [5]),
        ("-1", [29]),
        ("0,10,20:23", [0, 10, 20, 21, 22]),
        (" 3 , 1:3 ", [1, 2, 3]),
        (":", list(range(30))),
        ("25:99", list(range(25, 30))),
    ],
)
def test_parse_layer_spec(spec, rows):
    assert lens.parse_layer_spec(spec).resolve(30) == rows


@pytest.mark.parametrize("spec", ["a:b", "", "1:2:3", "1,,2", "x"])
def test_malformed_spec(spec):
    with pytest.raises(ConfigError, match=r"Malformed --layers .* use START:END"):
        lens.parse_layer_spec(spec)


def test_resolve_errors_name_the_depth():
    with pytest.raises(ConfigError, match=r"Layer 7 is out of range: .* 4 decoder layers \(0..3\)"):
        lens.parse_layer_spec("7").resolve(4)
    with pytest.raises(ConfigError, match=r"Layer -5 is out of range"):
        lens.parse_layer_spec("-5").resolve(4)
    with pytest.raises(ConfigError, match=r"Layers '9:' select no layer .* \(4 layers, 0..3\)"):
        lens.parse_layer_spec("9:").resolve(4)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4)


def test_logit_lens_takes_a_spec_or_layers(model):
    ids = [1, 2, 3, 4, 5]
    by_ints = lens.logit_lens(model, _Tokenizer(), ids, layers=[-1, 1, 1])
    assert by_ints.layers == [1, 3]
    for spec in ("1,-1", lens.parse_layer_spec("1,3:")):
        same = lens.logit_lens(model, _Tokenizer(), ids, layers=spec)
        assert same.layers == [1, 3] and (same.top_ids == by_ints.top_ids).all()
    with pytest.raises(ConfigError, match="out of range"):
        lens.logit_lens(model, _Tokenizer(), ids, layers="4")
    with pytest.raises(ConfigError, match="selection is empty"):
        lens.logit_lens(model, _Tokenizer(), ids, layers=[])


def test_inspect_generation_marks_the_chosen_layers(model):
    # Only these fields of a GenerationResult are read.
    result = SimpleNamespace(prompt_tokens=[1, 2, 3], tokens=[7, 8, 9], layers=[1, 3, 2])
    grid = lens.inspect_generation(model, _Tokenizer(), result, layers="1:")
    assert grid.token_ids == [1, 2, 3, 7, 8, 9]
    assert grid.prompt_length == 3 and grid.layers == [1, 2, 3]
    # Position j predicts token j + 1: the first generated token was chosen at position 2.
    assert grid.chosen_layers.tolist() == [-1, -1, 1, 3, 2, -1]
    assert lens.inspect_generation(model, _Tokenizer(), result).layers == [0, 1, 2, 3]
