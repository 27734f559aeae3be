"""GenerationOptions: the one carrier of generation settings, and what faces derive from it."""

from __future__ import annotations

import mlx.core as mx
import pytest

from layerdecode.errors import ConfigError
from layerdecode.options import GenerationOptions, option_fields


def test_build_layers_over_defaults():
    preset = GenerationOptions(repetition_penalty=1.2, temp=0.1, max_tokens=50)
    chosen = GenerationOptions.build({"temp": 0.5}, seed=3, top_p=None).over(preset)
    assert chosen.set_values() == {
        "temp": 0.5,
        "repetition_penalty": 1.2,
        "max_tokens": 50,
        "seed": 3,
    }
    assert GenerationOptions().over(None) == GenerationOptions()
    assert GenerationOptions().max_tokens_or_default() == 256


def test_stop_sequences_normalised():
    assert GenerationOptions.build(stop="\n\n").stop == ("\n\n",)
    assert GenerationOptions.build(stop=["a", "b", "a"]).stop_sequences == ("a", "b")
    assert GenerationOptions(stop=[]).stop is None
    # JSON-able for results files and presets, and read back the same.
    values = GenerationOptions(stop=["x"]).set_values()
    assert values == {"stop": ["x"]}
    assert GenerationOptions.build(values).stop == ("x",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temp": -1}, "Invalid generation option temp=-1"),
        ({"max_tokens": 0}, "max_tokens=0: .*positive"),
        ({"max_tokens": -2}, "Invalid generation option max_tokens=-2"),
        ({"stop": [""]}, "Invalid generation option stop="),
        ({"stop": ["a", 3]}, "Invalid generation option stop="),
        ({"temperature": 1.0}, "Unknown generation options: temperature. Did you mean 'temp'"),
        ({"seed": "7"}, "Invalid generation option seed='7'"),
    ],
)
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        GenerationOptions.build(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_options_object():
    with pytest.raises(ConfigError, match="options must be GenerationOptions or a mapping"):
        GenerationOptions.build(["temp"])


def test_sampler_and_processors():
    assert GenerationOptions().sampler() is None  # greedy: the loop's argmax
    assert GenerationOptions(temp=0.0).sampler() is None
    assert GenerationOptions(repetition_penalty=1.0).logits_processors() == []
    processors = GenerationOptions(repetition_penalty=1.5).logits_processors()
    assert len(processors) == 1
    logits = mx.array([[2.0, 1.0, 0.5]])
    penalised = processors[0](mx.array([0]), logits)
    assert penalised[0, 0].item() == pytest.approx(2.0 / 1.5)
    sampler = GenerationOptions(temp=1.0, top_k=1).sampler()
    assert sampler(mx.log(mx.array([[0.1, 0.7, 0.2]]))).item() == 1


def test_option_fields_describe_every_option():
    fields = {f.name: f for f in option_fields()}
    assert list(fields) == list(GenerationOptions.model_fields)
    top_p = fields["top_p"]
    assert (top_p.flag, top_p.type, top_p.minimum, top_p.maximum) == ("--top-p", float, 0.0, 1.0)
    assert top_p.min_open and not top_p.max_open
    assert top_p.help == GenerationOptions.model_fields["top_p"].description
    assert fields["stop"].multiple and fields["stop"].type is str
    assert fields["top_k"].type is int and fields["top_k"].minimum == 0
    assert fields["seed"].minimum is None


def test_logit_bias_and_presence_and_frequency_penalties_reach_the_tokens():
    from layerdecode.config import resolve_strategy
    from layerdecode.engine import Engine, Plan
    from layerdecode.testing import tiny_model

    model = tiny_model("llama")
    strategy = resolve_strategy("confident", {"window": 4})

    def tokens(**options):
        engine = Engine(model)
        engine.add([3, 17, 42, 8], Plan(strategy, GenerationOptions(max_tokens=12, **options)))
        return [e.token for step in engine.run() for e in step]

    plain = tokens()
    banned = plain[0]
    assert banned not in tokens(logit_bias={banned: -100.0})
    # The tiny model repeats itself; a presence or frequency penalty breaks the loop.
    assert len(set(plain)) < len(plain)
    for field in ("presence_penalty", "frequency_penalty"):
        penalised = tokens(**{field: 5.0})
        assert penalised != plain and len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize(
    "value, message",
    [
        (["12"], "give TOKEN_ID=BIAS"),
        ({"a": 1}, "is not a token id and a number"),
        ({"-3": 1}, "token ids are not negative"),
        ({"3": "x"}, "is not a token id and a number"),
    ],
)
def test_bad_logit_bias_is_one_line(value, message):
    with pytest.raises(ConfigError, match=message):
        GenerationOptions.build(logit_bias=value)
