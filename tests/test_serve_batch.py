"""Continuous batching (``LiveBatch``): rows that join mid-flight still equal single runs."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from layerdecode import GenerationOptions, resolve_strategy
from layerdecode.generation import stream_resolved
from layerdecode.live import LiveBatch
from layerdecode.testing import tiny_model, tiny_tokenizer

STRATEGIES = [("final", {}), ("confident", {"window": 4}), ("dola", {"layers": "high"})]


def prompts_of_lengths(*lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(n)] for n in lengths]


def single_run(model, tokenizer, prompt, name, params, max_tokens):
    options = GenerationOptions.build(max_tokens=max_tokens)
    ids = mx.array(prompt, dtype=mx.uint32)
    resolved = resolve_strategy(name, params)
    return [r.token for r in stream_resolved(model, tokenizer, ids, resolved, options)]


def run_live(batch, prompts, join_at, max_tokens, steps=60, cancel_at=None):
    out = {i: [] for i in range(len(prompts))}
    for n in range(steps):
        for i in join_at.get(n, []):
            batch.add(i, prompts[i], max_tokens=max_tokens)
        if cancel_at and n in cancel_at:
            batch.cancel(cancel_at[n])
        for token in batch.step():
            out[token.key].append(token.response.token)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name, params", STRATEGIES)
def test_rows_joining_mid_flight_equal_single_runs(arch, name, params):
    model, tokenizer = tiny_model(arch), TokenizerWrapper(tiny_tokenizer())
    prompts = prompts_of_lengths(5, 1, 9, 3, 14, 7)
    expected = [single_run(model, tokenizer, p, name, params, 10) for p in prompts]
    options = GenerationOptions.build(max_tokens=10)
    batch = LiveBatch(model, tokenizer, resolve_strategy(name, params), options)
    got = run_live(batch, prompts, {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]}, 10)
    assert [got[i] for i in range(len(prompts))] == expected
    assert len(batch) == 0 and batch.step() == []


def test_a_cancelled_row_leaves_and_the_others_go_on():
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    prompts = prompts_of_lengths(4, 6, 8, seed=1)
    expected = [single_run(model, tokenizer, p, "final", {}, 12) for p in prompts]
    batch = LiveBatch(model, tokenizer, resolve_strategy("final"), GenerationOptions())
    got = run_live(batch, prompts, {0: [0, 1, 2]}, 12, cancel_at={3: 1})
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == expected[1][: len(got[1])] and len(got[1]) <= 4


def test_logprobs_are_those_of_the_decoded_distribution():
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    batch = LiveBatch(model, tokenizer, resolve_strategy("final"), GenerationOptions())
    batch.add("a", [5, 6, 7], max_tokens=3, logprobs=3)
    tokens = [t for _ in range(5) for t in batch.step()]
    assert len(tokens) == 3
    for t in tokens:
        ids = [i for i, _ in t.top]
        values = [v for _, v in t.top]
        assert ids[0] == t.response.token and values == sorted(values, reverse=True)
        assert t.logprob == pytest.approx(values[0]) and t.logprob <= 0
