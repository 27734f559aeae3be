"""The CPU exp used for entropies is as accurate as float32 allows, and exact at the edges."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from layerdecode import fastmath
from layerdecode.view import entropy_of


def test_exp_shifted_relative_error_below_float32_resolution():
    x = np.concatenate([np.linspace(-87.0, 0.0, 400_001), -np.geomspace(1e-8, 1.0, 1001)])
    x = x.astype(np.float32)
    reference = np.exp(x.astype(np.float64))
    for fn in (fastmath._exp_poly, fastmath.exp_shifted):
        got = np.array(fn(mx.array(x))).astype(np.float64)
        assert np.max(np.abs(got - reference) / reference) < 2e-7


def test_exp_shifted_edges():
    x = mx.array([0.0, -88.0, -1000.0, -np.inf], dtype=mx.float32)
    got = np.array(fastmath.exp_shifted(x))
    assert got[0] == 1.0
    assert (got[1:] == 0.0).all()


def test_entropy_of_matches_float64_with_masked_tokens():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(7, 3, 5000)) * rng.uniform(0.1, 8, (7, 3, 1))).astype(np.float32)
    logits[0, 0, :4000] = -np.inf  # DoLa-style masked tokens
    x = logits.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    got = np.array(entropy_of(mx.array(logits)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference, rtol=2e-5, atol=2e-6)
