"""Batched decoding: each row equals its single-prompt run, rows finish independently."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

from layerdecode.batch import batch_generate_step
from layerdecode.errors import ConfigError, LayerdecodeError
from layerdecode.generation import generate_step
from layerdecode.registry import get_strategy
from layerdecode.testing import tiny_model

STRATEGIES = [
    ("final", {}),
    ("confident", {"window": 6}),
    ("confident", {"window": 4, "method": "trough-m1"}),
    ("dola", {"layers": "high"}),
    ("dola", {"layers": [0, 2, 3]}),
    ("fixed", {"layer": 2}),
    ("sled", {}),
    ("sled", {"layers": [0, 2, 3], "evolution_scale": 4, "evolution_rate": 0.5}),
]


def prompts_of_lengths(*lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, 200) for _ in range(n)] for n in lengths]


def single_runs(model, prompts, name, params, n, **kwargs):
    return [
        [
            (s.token, s.layer, s.extras)
            for s in generate_step(
                mx.array(p, dtype=mx.uint32),
                model,
                get_strategy(name, **params),
                max_tokens=n,
                **kwargs,
            )
        ]
        for p in prompts
    ]


def batch_rows(model, prompts, name, params, n, **kwargs):
    rows = {i: [] for i in range(len(prompts))}
    for step in batch_generate_step(
        prompts, model, get_strategy(name, **params), max_tokens=n, **kwargs
    ):
        for r in step:
            rows[r.row].append((r.token, r.layer, r.extras))
    return [rows[i] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "mixtral", "phi3"])
@pytest.mark.parametrize("name, params", STRATEGIES)
def test_rows_equal_single_prompt_runs(arch, name, params):
    model = tiny_model(arch)
    prompts = prompts_of_lengths(1, 3, 17, 40, 8)
    assert batch_rows(model, prompts, name, params, 10) == single_runs(
        model, prompts, name, params, 10
    )


def test_rows_finish_independently_and_stop_costing():
    model = tiny_model("llama")
    prompts = prompts_of_lengths(5, 9, 2)
    sizes = []
    steps = list(batch_generate_step(prompts, model, get_strategy("final"), max_tokens=[2, 6, 4]))
    for step in steps:
        sizes.append(len(step))
    assert sizes == [3, 3, 2, 2, 1, 1]
    finished = [r for step in steps for r in step if r.finish_reason]
    assert [(r.row, r.finish_reason) for r in finished] == [
        (0, "length"),
        (2, "length"),
        (1, "length"),
    ]


def test_stop_tokens_end_a_row():
    model = tiny_model("llama")
    prompts = prompts_of_lengths(5, 9)
    rows = batch_rows(model, prompts, "final", {}, 8)
    stop = rows[0][2][0]  # the third token of row 0 ends it
    steps = list(
        batch_generate_step(prompts, model, get_strategy("final"), max_tokens=8, stop_tokens=[stop])
    )
    row0 = [r for step in steps for r in step if r.row == 0]
    assert row0[-1].token == stop and row0[-1].finish_reason == "stop"
    assert len(row0) == [t for t, _, _ in rows[0]].index(stop) + 1


def test_processors_are_per_row():
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny_model("qwen2")
    prompts = prompts_of_lengths(4, 12, 7)
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    assert batch_rows(
        model, prompts, "confident", {"window": 6}, 10, logits_processors=processors
    ) == single_runs(model, prompts, "confident", {"window": 6}, 10, logits_processors=processors)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "No prompts given"),
        ([[1, 2], []], {}, "Prompt 1 of the batch is empty"),
        ([[1, 2]], {"max_tokens": 0}, "max_tokens must be positive"),
    ],
)
def test_bad_batches(prompts, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        next(batch_generate_step(prompts, tiny_model("llama"), get_strategy("final"), **kwargs))


def test_batch_too_large_for_memory():
    with pytest.raises(LayerdecodeError, match="use a smaller batch size"):
        next(
            batch_generate_step(
                [[1] * 4096] * 512, tiny_model("llama"), get_strategy("final"), max_tokens=10**7
            )
        )
