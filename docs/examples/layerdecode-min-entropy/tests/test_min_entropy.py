"""Tests of the min-entropy strategy, written with layerdecode.testing (run: pytest tests)."""

import numpy as np
import pytest
from layerdecode_min_entropy import MinEntropyStrategy

import layerdecode
from layerdecode.testing import check_final_matches_mlx_lm, select_on, tiny_model, tiny_tokenizer


def np_entropy(logits):
    x = logits.astype(np.float64)
    logprobs = x - x.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    return -(np.exp(logprobs) * logprobs).sum(-1)


@pytest.mark.parametrize("window", [1, 3, 12, 50])
def test_picks_the_lowest_entropy_layer(window):
    rng = np.random.default_rng(window)
    # A temperature per layer and row gives each row its own entropy profile.
    logits = rng.normal(size=(12, 16, 40)) * rng.uniform(0.2, 4.0, size=(12, 16, 1))
    logits = logits.astype(np.float32)  # (layers, batch, vocab)
    decision = select_on(MinEntropyStrategy(window=window), logits)

    first = max(0, 12 - window)
    entropy = np_entropy(logits)  # (layers, batch)
    expected = first + entropy[first:].argmin(axis=0)
    rows = np.arange(16)
    np.testing.assert_array_equal(np.array(decision.layers), expected)
    np.testing.assert_array_equal(np.array(decision.logits), logits[expected, rows])
    np.testing.assert_allclose(
        np.array(decision.entropy), entropy[expected, rows], rtol=1e-4, atol=1e-5
    )
    if window > 1:  # not always the final layer: the test has something to check
        assert len(set(expected.tolist())) > 1


def test_window_of_one_is_the_models_own_output():
    # Only the final layer is left: the tokens must be mlx-lm's, one for one.
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    strategy = MinEntropyStrategy(window=1)
    check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", strategy=strategy)


def test_generates_from_the_last_layers():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()  # 6 decoder layers
    strategy = MinEntropyStrategy(window=4)
    result = layerdecode.generate(model, tokenizer, "w7 w8 w9", strategy=strategy, max_tokens=8)
    assert len(result.tokens) > 0
    assert all(2 <= layer <= 5 for layer in result.layers)
