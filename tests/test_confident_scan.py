"""confident's lazy scan against its eager scan (the official one) and a counting reference.

The lazy scan decodes a layer only for the rows whose entropy is still falling above it; it
must choose the same layers and give the same tokens as decoding every candidate at once.
"""

from __future__ import annotations

import math
import random
import typing

import mlx.core as mx
import numpy as np
import pytest

from layerdecode.batch import batch_generate_step
from layerdecode.errors import ConfigError
from layerdecode.generation import generate_step
from layerdecode.registry import get_strategy
from layerdecode.strategies.confident import _ROUND_ROWS as ROUND_ROWS
from layerdecode.strategies.confident import Method
from layerdecode.strategy import ModelFacts
from layerdecode.testing import select_on, tiny_model

METHODS = list(typing.get_args(Method))
ARCHS = ["llama", "qwen3", "gemma3_text", "mixtral", "cohere"]


def np_entropy(x):
    x = x.astype(np.float64)
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return -(np.exp(lp) * lp).sum(-1)


def walk_count(layer_logits, window):
    """Head products the walk compares: final, each layer it reaches, the one that stops it."""
    n, batch = layer_logits.shape[:2]
    first = n - min(n, window)
    ent = np_entropy(layer_logits)
    total = 0
    for row in range(batch):
        layer, count = n - 1, 1
        while layer - 1 >= first:
            count += 1
            if not ent[layer - 1, row] < ent[layer, row]:
                break
            layer -= 1
        total += count
    return total


def lazy_projections(layer_logits, window, round_rows=ROUND_ROWS):
    """Head products of the lazy walk: final and the layer below for every row, then rounds
    that decode, for the rows still walking, about ``max(round_rows, 2 * batch)`` rows."""
    n, batch = layer_logits.shape[:2]
    first = n - min(n, window)
    ent = np_entropy(layer_logits)  # (layers, batch)
    if n - 2 < first:
        return batch
    total = 2 * batch
    walking = [row for row in range(batch) if ent[n - 2, row] < ent[n - 1, row]]
    layer = n - 3
    while walking and layer >= first:
        depth = min(layer - first + 1, math.ceil(max(round_rows, 2 * batch) / len(walking)))
        total += depth * len(walking)
        span = range(layer, layer - depth, -1)
        walking = [r for r in walking if all(ent[lay, r] < ent[lay + 1, r] for lay in span)]
        layer -= depth
    return total


def profiles(seed, layers=12, batch=16, vocab=40, deep=True):
    rng = np.random.default_rng(seed)
    # Temperatures falling towards the bottom make long walks as well as short ones.
    temps = np.linspace(4.0, 0.3, layers)[:, None, None] * rng.uniform(0.5, 1.5, (layers, batch, 1))
    logits = (rng.normal(size=(layers, batch, vocab)) * temps[::-1]).astype(np.float32)
    if deep:  # row 0 sharpens layer by layer going down: its walk reaches the window's bottom
        logits[:, 0] = logits[-1, 0] * (1 + 0.2 * np.arange(layers, 0, -1))[:, None]
    # Equal neighbours in some rows: a tie stops the walk.
    for layer in range(1, layers, 3) if batch > 1 else ():
        row = 1 + layer % (batch - 1)
        logits[layer - 1, row] = logits[layer, row]
    return logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("window", [1, 2, 5, 12])
def test_lazy_decisions_equal_eager(method, window):
    logits = profiles(window * 7 + len(method))
    eager = select_on(get_strategy("confident", window=window, method=method, scan="eager"), logits)
    lazy = select_on(get_strategy("confident", window=window, method=method, scan="lazy"), logits)
    np.testing.assert_array_equal(np.array(lazy.layers), np.array(eager.layers))
    np.testing.assert_array_equal(np.array(lazy.logits), np.array(eager.logits))
    np.testing.assert_array_equal(np.array(lazy.entropy), np.array(eager.entropy))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_lazy_projections_follow_the_walk(batch):
    parts = [profiles(seed, batch=batch, layers=24, deep=seed == 0) for seed in range(4)]
    logits = np.concatenate(parts, axis=1)
    strategy = get_strategy("confident", window=20, scan="lazy")
    decision = select_on(strategy, logits)
    layers = np.array(decision.layers)
    assert (layers < 22).any(), "the profiles must make walks beyond the first round"
    assert strategy.stats.projections == lazy_projections(logits, 20)
    assert strategy.stats.walked == walk_count(logits, 20)
    assert strategy.stats.tokens == 4 * batch
    eager = get_strategy("confident", window=20, scan="eager")
    select_on(eager, logits)
    assert eager.stats.projections == 20 * 4 * batch
    assert strategy.stats.per_token < eager.stats.per_token


def test_lazy_p_mixing_equals_eager():
    logits = profiles(5)
    params = dict(window=8, p=0.5, seed=3)
    eager = select_on(get_strategy("confident", scan="eager", **params), logits)
    lazy = select_on(get_strategy("confident", scan="lazy", **params), logits)
    np.testing.assert_array_equal(np.array(lazy.layers), np.array(eager.layers))
    np.testing.assert_array_equal(np.array(lazy.logits), np.array(eager.logits))
    assert (np.array(lazy.layers) == 11).any() and (np.array(lazy.layers) < 11).any()


def test_auto_is_lazy_on_the_cpu_and_scan_is_validated():
    strategy = get_strategy("confident")
    strategy.prepare(ModelFacts(12))
    assert strategy.lazy == (mx.default_device() == mx.cpu)
    assert (strategy.exits() == []) == strategy.lazy  # the lazy scan declares nothing
    with pytest.raises(ConfigError, match="scan"):
        get_strategy("confident", scan="sideways")


def prompts(*lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, 200) for _ in range(n)] for n in lengths]


def single(model, params, prompt, n=8):
    steps = generate_step(
        mx.array(prompt, dtype=mx.uint32),
        model,
        get_strategy("confident", **params),
        max_tokens=n,
    )
    return [(s.token, s.layer) for s in steps]


def batched(model, params, batch, n=8):
    rows = {i: [] for i in range(len(batch))}
    for step in batch_generate_step(
        batch, model, get_strategy("confident", **params), max_tokens=n
    ):
        for r in step:
            rows[r.row].append((r.token, r.layer))
    return [rows[i] for i in range(len(batch))]


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_generation_equals_eager(arch):
    model = tiny_model(arch, num_layers=8)
    batch = prompts(3, 11, 6, 1)
    seen = set()
    for method, p in [("trough", 1.0), ("trough-m2", 1.0), ("trough-p1", 0.6)]:
        params = dict(window=7, method=method, p=p, seed=1)
        eager = batched(model, params | {"scan": "eager"}, batch)
        assert batched(model, params | {"scan": "lazy"}, batch) == eager
        assert single(model, params | {"scan": "lazy"}, batch[1]) == single(
            model, params | {"scan": "eager"}, batch[1]
        )
        seen |= {layer for row in eager for _, layer in row}
    assert len(seen) >= 3, f"the tiny model chose only layers {seen}: the test checks too little"


def test_entropy_in_row_chunks_equals_one_pass():
    from layerdecode.view import ENTROPY_CHUNK_ROWS, _entropy, entropy_of

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2 * ENTROPY_CHUNK_ROWS + 3, 500)).astype(np.float32) * 3
    logits[0, 1, :10] = -np.inf
    chunked = np.array(entropy_of(mx.array(logits)))
    np.testing.assert_array_equal(chunked, np.array(_entropy(mx.array(logits))))
    np.testing.assert_allclose(
        chunked, np_entropy(np.where(np.isinf(logits), -1e30, logits)), rtol=1e-5
    )
