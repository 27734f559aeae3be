"""The core loop: `final` is token-identical to mlx-lm; strategies plug in per step."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from layerdecode.errors import ConfigError
from layerdecode.generation import generate_step
from layerdecode.options import GenerationOptions
from layerdecode.registry import get_strategy
from layerdecode.strategy import Decision, Strategy, StrategyParams
from layerdecode.testing import TINY_ARCHITECTURES as ARCHS
from layerdecode.testing import tiny_model
from layerdecode.view import Exit

PROMPT = mx.array([3, 17, 42, 8, 99, 5, 23, 61, 7, 7, 12], dtype=mx.uint32)


def mlx_tokens(model, prompt=PROMPT, n=24, **kwargs):
    return [t for t, _ in mlx_generate_step(prompt, model, max_tokens=n, **kwargs)]


def our_steps(model, strategy, prompt=PROMPT, n=24, **kwargs):
    return list(generate_step(prompt, model, strategy, max_tokens=n, **kwargs))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_final_matches_mlx_lm_on_every_architecture(arch):
    model = tiny_model(arch)
    expected = mlx_tokens(model)
    steps = our_steps(model, get_strategy("final"))
    assert [s.token for s in steps] == expected
    assert {s.layer for s in steps} == {len(model.model.layers) - 1}
    # confident with p=0 and fixed at the last layer are the final layer too.
    assert [s.token for s in our_steps(model, get_strategy("confident", p=0.0))] == expected
    assert [s.token for s in our_steps(model, get_strategy("fixed", layer=-1))] == expected
    # sled without evolution keeps the final layer's ranking.
    sled = get_strategy("sled", evolution_rate=0.0)
    assert [s.token for s in our_steps(model, sled)] == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_confident_picks_layers_and_fixed_reads_its_layer(arch):
    model = tiny_model(arch)
    steps = our_steps(model, get_strategy("confident", window=6))
    assert all(0 <= s.layer < 6 for s in steps)
    assert all(s.entropy >= 0 for s in steps)
    steps = our_steps(model, get_strategy("fixed", layer=2))
    assert {s.layer for s in steps} == {2}


def test_final_logprobs_match_mlx_lm():
    model = tiny_model("llama")
    ours = our_steps(model, get_strategy("final"), n=5)
    theirs = list(mlx_generate_step(PROMPT, model, max_tokens=5))
    for step, (_, logprobs) in zip(ours, theirs, strict=True):
        assert mx.array_equal(step.logprobs, logprobs).item()


def test_sampling_and_processors_match_mlx_lm():
    model = tiny_model("qwen2")
    sampler_kwargs = dict(temp=0.8, top_p=0.9)
    processors = make_logits_processors(repetition_penalty=1.3, repetition_context_size=10)
    mx.random.seed(11)
    expected = mlx_tokens(
        model, sampler=make_sampler(**sampler_kwargs), logits_processors=processors
    )
    mx.random.seed(11)
    got = our_steps(
        model,
        get_strategy("final"),
        sampler=make_sampler(**sampler_kwargs),
        logits_processors=processors,
    )
    assert [s.token for s in got] == expected


def test_long_prompt_is_prefilled_in_chunks():
    model = tiny_model("llama")
    prompt = mx.array(list(range(1, 60)), dtype=mx.uint32)
    expected = mlx_tokens(model, prompt, prefill_step_size=16)
    got = our_steps(model, get_strategy("confident", p=0.0), prompt, prefill_step_size=16)
    assert [s.token for s in got] == expected


class CountingStrategy(Strategy):
    """Records which exits the view decoded, to check nothing else is computed."""

    name = "counting"
    Params = StrategyParams

    def exits(self):
        return [Exit(1)]

    def select(self, view):
        self.decoded = view.decoded
        return Decision(view.logits(1), mx.full((view.batch_size,), 1), view.entropy(1))


def test_only_declared_exits_are_decoded():
    strategy = CountingStrategy()
    steps = our_steps(tiny_model("llama"), strategy, n=3)
    assert strategy.decoded == [(1, True)]  # the declared exit only
    assert {s.layer for s in steps} == {1}


def test_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        next(
            generate_step(mx.array([], dtype=mx.uint32), tiny_model("llama"), get_strategy("final"))
        )
    with pytest.raises(ConfigError, match=r"1-D token ids, got shape \(1, 2\)"):
        generate_step(mx.array([[5, 6]]), tiny_model("llama"), get_strategy("final"))


@pytest.mark.parametrize(
    "option, value",
    [("temp", -0.5), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0)],
)
def test_bad_generation_options(option, value):
    unset = ("temp", "top_p", "min_p", "top_k", "repetition_penalty", "repetition_context_size")
    kwargs = {**dict.fromkeys(unset), option: value}
    with pytest.raises(ConfigError, match=f"Invalid generation option {option}="):
        GenerationOptions.build(**kwargs)
