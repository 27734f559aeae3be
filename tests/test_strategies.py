"""Every built-in strategy against an independent numpy reference on small random logits.

``layerdecode.testing.select_on`` builds the view over an identity "head", so each layer's
hidden state *is* its logits and the references below work on plain numpy arrays.
"""

from __future__ import annotations

import math
import typing

import mlx.core as mx
import numpy as np
import pytest

from layerdecode.errors import ConfigError
from layerdecode.registry import get_strategy
from layerdecode.strategies.confident import Method
from layerdecode.strategy import ModelFacts
from layerdecode.testing import select_on, view_over

# Every method the params accept; each is checked against the loop reference below.
CONFIDENT_METHODS = list(typing.get_args(Method))
assert len(CONFIDENT_METHODS) == 9


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_entropy(x):
    lp = np_log_softmax(x)
    return -(np.exp(lp) * lp).sum(-1)


# -- confident -------------------------------------------------------------------------


def confident_reference(layer_logits, window, method, n_total=None):
    """Loop-based walk, written from the paper's description of the rule."""
    n = layer_logits.shape[0]
    count = min(n, window)
    first = n - count
    batch = layer_logits.shape[1]
    chosen = []
    for row in range(batch):
        if method.startswith("last-m"):
            target = n - 1 - int(method[len("last-m") :])
            chosen.append(min(max(target, first), n - 1))
            continue
        ent = [np_entropy(layer_logits[layer, row]) for layer in range(n)]
        layer = n - 1
        while layer - 1 >= first and ent[layer - 1] < ent[layer]:
            layer -= 1
        shift = {"trough": 0, "trough-m1": -1, "trough-m2": -2, "trough-p1": 1, "trough-p2": 2}[
            method
        ]
        chosen.append(min(max(layer + shift, first), n - 1))
    return np.array(chosen)


@pytest.mark.parametrize("method", CONFIDENT_METHODS)
@pytest.mark.parametrize("window", [1, 3, 10, 50])
def test_confident_matches_reference(method, window):
    rng = np.random.default_rng(window * 31 + len(method))
    # Random temperatures per layer and row give varied entropy profiles.
    layer_logits = rng.normal(size=(12, 16, 40)) * rng.uniform(0.2, 4.0, size=(12, 16, 1))
    layer_logits = layer_logits.astype(np.float32)
    decision = select_on(get_strategy("confident", window=window, method=method), layer_logits)
    expected = confident_reference(layer_logits, window, method)
    np.testing.assert_array_equal(np.array(decision.layers), expected)
    rows = np.arange(layer_logits.shape[1])
    np.testing.assert_array_equal(np.array(decision.logits), layer_logits[expected, rows])
    np.testing.assert_allclose(
        np.array(decision.entropy),
        np_entropy(layer_logits[expected, rows]),
        rtol=1e-4,
        atol=1e-5,
    )


def profile_logits(entropy_order, vocab=8):
    """Logits per layer whose entropies follow ``entropy_order`` (higher value = flatter)."""
    out = []
    for level in entropy_order:
        logits = np.zeros(vocab, dtype=np.float32)
        logits[0] = 8.0 - level  # the larger the level, the flatter the distribution
        out.append(logits)
    return np.stack(out)


def test_confident_rows_choose_different_layers():
    # Row 0: entropy falls from the final layer down to layer 3 then rises: valley at 3.
    # Row 1: entropy rises right below the final layer: stays final.
    # Row 2: the global minimum is at layer 0, but a bump at layer 4 stops the walk at 5.
    rows = [
        profile_logits([5, 4, 3, 0, 1, 2, 3, 4]),
        profile_logits([0, 0, 0, 0, 0, 0, 5, 4]),
        profile_logits([-9, 5, 5, 5, 6, 1, 2, 3]),
    ]
    layer_logits = np.stack(rows, axis=1)  # (layers, batch, vocab)
    decision = select_on(get_strategy("confident", window=8), layer_logits)
    assert np.array(decision.layers).tolist() == [3, 7, 5]


def test_confident_ties_stop_the_walk():
    # Equal entropy is not a strict decrease: the walk stops at the final layer.
    layer_logits = np.stack([profile_logits([2, 2, 2, 2])], axis=1)
    decision = select_on(get_strategy("confident", window=4), layer_logits)
    assert np.array(decision.layers).tolist() == [3]
    # A tie further down stops the walk there.
    layer_logits = np.stack([profile_logits([0, 1, 1, 2])], axis=1)
    decision = select_on(get_strategy("confident", window=4), layer_logits)
    assert np.array(decision.layers).tolist() == [2]


def test_confident_window_larger_than_model_and_ratio():
    layer_logits = np.stack([profile_logits([0, 1, 2, 3, 4])], axis=1)
    decision = select_on(get_strategy("confident", window=100), layer_logits)
    assert np.array(decision.layers).tolist() == [0]
    # ratio 0.4 of 5 layers -> ceil(2) candidates: layers 3 and 4.
    decision = select_on(get_strategy("confident", window_ratio=0.4), layer_logits)
    assert np.array(decision.layers).tolist() == [3]


def test_confident_p0_is_final_and_p1_is_selected():
    rng = np.random.default_rng(0)
    layer_logits = (rng.normal(size=(10, 64, 30)) * rng.uniform(0.2, 4, (10, 64, 1))).astype(
        np.float32
    )
    final = select_on(get_strategy("confident", window=10, p=0.0), layer_logits)
    assert np.array(final.layers).tolist() == [9] * 64
    np.testing.assert_array_equal(np.array(final.logits), layer_logits[-1])
    selected = select_on(get_strategy("confident", window=10, p=1.0), layer_logits)
    expected = confident_reference(layer_logits, 10, "trough")
    np.testing.assert_array_equal(np.array(selected.layers), expected)
    assert (expected != 9).any()


def test_confident_p_mixing_draws_per_row():
    rng = np.random.default_rng(1)
    layer_logits = (rng.normal(size=(6, 2000, 12)) * rng.uniform(0.1, 6, (6, 2000, 1))).astype(
        np.float32
    )
    selected = confident_reference(layer_logits, 6, "trough")
    movable = selected != 5

    def layers(**params):
        return np.array(
            select_on(get_strategy("confident", window=6, p=0.3, **params), layer_logits).layers
        )

    # Without a seed, MLX's global random state draws for every row.
    mx.random.seed(7)
    a = layers()
    mx.random.seed(7)
    np.testing.assert_array_equal(a, layers())
    # Each row is either its selected layer or the final one...
    assert np.all((a == selected) | (a == 5))
    # ...and about 30% of the rows that could move did.
    share = (a[movable] == selected[movable]).mean()
    assert abs(share - 0.3) < 0.05
    # A seed gives each row a key of its own (the same alone or batched): rows seeded alike
    # draw alike, so these rows all move, or none does; some seeds move them, some do not.
    moved = [layers(seed=seed)[movable] == selected[movable] for seed in range(6)]
    assert all(m.all() or not m.any() for m in moved)
    assert {bool(m.all()) for m in moved} == {True, False}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"window": 0}, "window"),
        ({"window": "10"}, "window"),
        ({"p": 1.5}, "p:"),
        ({"p": -0.1}, "p:"),
        ({"method": "valley"}, "method"),
        ({"window": 4, "window_ratio": 0.5}, "either window or window_ratio"),
        ({"window_ratio": 0.0}, "window_ratio"),
        ({"windw": 4}, "unknown parameter 'windw'"),
    ],
)
def test_confident_rejects_bad_params(params, message):
    with pytest.raises(ConfigError) as err:
        get_strategy("confident", **params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# -- fixed -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer, expected", [(0, 0), (3, 3), (-1, 7), (-8, 0), (-3, 5)])
def test_fixed_layer(layer, expected):
    rng = np.random.default_rng(layer + 10)
    layer_logits = rng.normal(size=(8, 3, 20)).astype(np.float32)
    decision = select_on(get_strategy("fixed", layer=layer), layer_logits)
    assert np.array(decision.layers).tolist() == [expected] * 3
    np.testing.assert_array_equal(np.array(decision.logits), layer_logits[expected])
    np.testing.assert_allclose(
        np.array(decision.entropy), np_entropy(layer_logits[expected]), rtol=1e-5
    )


@pytest.mark.parametrize("layer", [8, -9, 100])
def test_fixed_out_of_range(layer):
    strategy = get_strategy("fixed", layer=layer)
    with pytest.raises(ConfigError, match="out of range for a model with 8 decoder layers"):
        strategy.prepare(ModelFacts(8))


def test_final_is_the_models_output():
    rng = np.random.default_rng(3)
    layer_logits = rng.normal(size=(5, 2, 20)).astype(np.float32)
    decision = select_on(get_strategy("final"), layer_logits)
    np.testing.assert_array_equal(np.array(decision.logits), layer_logits[-1])
    assert np.array(decision.layers).tolist() == [4, 4]
    with pytest.raises(ConfigError, match="unknown parameter 'layer'"):
        get_strategy("final", layer=3)


# -- dola ------------------------------------------------------------------------------


def hf_candidates(spec, n, tied):
    """HF transformers' candidate premature layers, restated from its documentation."""
    start = 0 if not tied else (2 if n > 2 else (1 if n == 2 else 0))
    if spec == "low":
        if start == n // 2:
            return [start]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    if spec == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    return list(spec)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 30, 40, 41, 64])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("spec", ["high", "low"])
def test_dola_candidate_layers_follow_hf(n, tied, spec):
    from layerdecode.strategies.dola import candidate_layers

    expected = hf_candidates(spec, n, tied)
    if not expected:
        strategy = get_strategy("dola", layers=spec)
        with pytest.raises(ConfigError, match="selects no premature layer"):
            strategy.prepare(ModelFacts(n, tied))
        return
    assert candidate_layers(spec, n, tied) == expected
    # Spot values: 30 tied layers -> high 15..29 step 2, low 2..14 step 2.
    if n == 30 and tied:
        assert expected == (list(range(15, 30, 2)) if spec == "high" else list(range(2, 15, 2)))


def dola_reference(final, premature, relative_top=0.1):
    """Numpy DoLa for one row: HF's JS selection (vocab-mean) and relative-top mask."""
    lf = np_log_softmax(final)
    js = []
    for p in premature:
        lp = np_log_softmax(p)
        m = 0.5 * (np.exp(lf) + np.exp(lp))
        kl1 = np.mean(m * (np.log(m) - lf))
        kl2 = np.mean(m * (np.log(m) - lp))
        js.append(0.5 * (kl1 + kl2))
    best = int(np.argmax(js))
    lb = np_log_softmax(premature[best])
    out = lf - lb
    out[lf < lf.max() + math.log(relative_top)] = -np.inf
    return out, best


@pytest.mark.parametrize("premature_norm", [False, True])
def test_dola_matches_reference(premature_norm):
    rng = np.random.default_rng(5)
    n, batch, vocab = 8, 6, 30
    layer_logits = (rng.normal(size=(n, batch, vocab)) * rng.uniform(0.3, 3, (n, batch, 1))).astype(
        np.float32
    )
    embeddings = rng.normal(size=(batch, vocab)).astype(np.float32)
    hf_layers = [0, 2, 5, 7]
    strategy = get_strategy("dola", layers=hf_layers, premature_norm=premature_norm)
    decision = select_on(strategy, layer_logits, embeddings=embeddings)
    # HF index i -> hidden state of decoder layer i-1; 0 -> the embedding output.
    hidden = [embeddings] + [layer_logits[i] for i in range(n)]
    for row in range(batch):
        premature = [hidden[i][row] for i in hf_layers]
        expected, best = dola_reference(layer_logits[-1, row], premature)
        got = np.array(decision.logits[row])
        assert np.array_equal(np.isinf(got), np.isinf(expected))
        finite = ~np.isinf(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
        assert int(decision.extras["premature_layer"][row]) == hf_layers[best] - 1
    assert np.array(decision.layers).tolist() == [n - 1] * batch


def test_dola_rows_pick_their_own_premature_layer():
    # Row 0's layer 1 and row 1's layer 3 are far from the final layer; the rest agree.
    vocab = 10
    final = np.zeros((2, vocab), np.float32)
    final[:, 0] = 5
    layers = np.repeat(final[None], 5, axis=0).copy()
    layers[1, 0] = np.linspace(5, -5, vocab)
    layers[3, 1] = np.linspace(-5, 5, vocab)
    decision = select_on(get_strategy("dola", layers=[2, 4]), layers)
    assert np.array(decision.extras["premature_layer"]).tolist() == [1, 3]


def test_dola_single_layer_skips_selection():
    rng = np.random.default_rng(9)
    layer_logits = rng.normal(size=(4, 2, 16)).astype(np.float32)
    decision = select_on(get_strategy("dola", layers=[2]), layer_logits)
    for row in range(2):
        expected, _ = dola_reference(layer_logits[-1, row], [layer_logits[1, row]])
        got = np.array(decision.logits[row])
        finite = ~np.isinf(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
    assert np.array(decision.extras["premature_layer"]).tolist() == [1, 1]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"layers": "middle"}, "layers"),
        ({"layers": []}, "at least one premature layer"),
        ({"relative_top": 0}, "relative_top"),
        ({"relative_top": 1.5}, "relative_top"),
        ({"alpha": 1}, "unknown parameter 'alpha'"),
    ],
)
def test_dola_rejects_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy("dola", **params)


def test_dola_layers_out_of_range():
    strategy = get_strategy("dola", layers=[2, 30])
    with pytest.raises(ConfigError, match=r"premature layers \[30\] are out of range"):
        strategy.prepare(ModelFacts(30, True))


# -- sled ------------------------------------------------------------------------------


def sled_reference(final, premature, *, rate, scale, lower):
    """Per row, written from the official code's greedy step with explicit vectors.

    ``final`` is ``(batch, vocab)``, ``premature`` ``(layers, batch, vocab)``; returns the
    next-token logits and the number of candidates the layers pulled on, per row.
    """
    final, premature = final.astype(np.float64), premature.astype(np.float64)
    out = np.empty_like(final)
    pulled = []
    for b in range(final.shape[0]):
        f, layers = final[b], premature[:, b]
        p_final = np.exp(np_log_softmax(f))
        top = np.argsort(-p_final, kind="stable")[:scale]
        cos = np.zeros((len(layers), len(top)))
        for i, layer in enumerate(layers):
            d = layer - f
            for j, token in enumerate(top):
                g = np.exp(np_log_softmax(layer))
                g[token] -= 1.0  # the gradient towards a one-hot at the candidate
                cos[i, j] = g @ d / (max(np.linalg.norm(g), 1e-8) * max(np.linalg.norm(d), 1e-8))
        votes = np.maximum(cos, 0.0) ** 2
        sums = votes.sum(axis=1)
        votes[sums != 0] /= sums[sums != 0][:, None]
        weights = sums / sums.sum() if sums.sum() != 0 else sums
        delta = np.zeros_like(f)
        for i in range(len(layers)):
            for j, token in enumerate(top):
                delta[token] -= weights[i] * votes[i, j]
        evolved = f - rate * (p_final + delta)
        out[b] = lower
        out[b, top] = evolved[top]
        pulled.append(int((delta[top] < 0).sum()))
    return out, pulled


def sled_case(seed=0, layers=6, batch=4, vocab=40):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, size=(layers, batch, 1))
    layer_logits = (rng.normal(size=(layers, batch, vocab)) * scale).astype(np.float32)
    embeddings = rng.normal(size=(batch, vocab)).astype(np.float32)
    return layer_logits, embeddings


def run_sled(layer_logits, embeddings, norm=None, **params):
    strategy = get_strategy("sled", **params)
    strategy.prepare(ModelFacts(layer_logits.shape[0], True, "test"))
    view = view_over(layer_logits, embeddings=embeddings, exits=strategy.exits(), norm=norm)
    decision = strategy.select(view)
    mx.eval(decision.logits, decision.layers, decision.entropy, *decision.extras.values())
    return decision


def check_sled(decision, layer_logits, premature, **params):
    expected, pulled = sled_reference(
        layer_logits[-1],
        premature,
        rate=params.get("evolution_rate", 2.0),
        scale=params.get("evolution_scale", 10),
        lower=params.get("evolution_lower_bound", -1000.0),
    )
    np.testing.assert_allclose(np.array(decision.logits), expected, rtol=1e-4, atol=1e-5)
    assert np.array(decision.extras["evolved_tokens"]).tolist() == pulled
    final = layer_logits.shape[0] - 1
    assert np.array(decision.layers).tolist() == [final] * layer_logits.shape[1]
    np.testing.assert_allclose(
        np.array(decision.entropy), np_entropy(layer_logits[-1]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("scale", [1, 3, 10, 40])
@pytest.mark.parametrize("rate", [0.0, 0.5, 2.0, 25.0])
def test_sled_matches_reference(scale, rate):
    layer_logits, embeddings = sled_case(seed=scale)
    params = {"evolution_rate": rate, "evolution_scale": scale}
    decision = run_sled(layer_logits, embeddings, **params)
    # 'all': the embedding output and every decoder layer below the final one.
    premature = np.concatenate([embeddings[None], layer_logits[:-1]])
    check_sled(decision, layer_logits, premature, **params)
    # The layers pulled on candidates: the reference's vote path is exercised.
    assert sum(np.array(decision.extras["evolved_tokens"]).tolist()) > 0


def test_sled_lower_bound_and_layer_subset():
    layer_logits, embeddings = sled_case(seed=7, layers=8)
    params = {"layers": [3, 0, 5], "evolution_scale": 5, "evolution_lower_bound": -2.0}
    decision = run_sled(layer_logits, embeddings, **params)
    # HF numbering: 0 is the embeddings, 3 and 5 the outputs of decoder layers 2 and 4.
    premature = np.stack([layer_logits[2], embeddings, layer_logits[4]])
    check_sled(decision, layer_logits, premature, **params)
    logits = np.array(decision.logits)
    assert ((logits == -2.0).sum(axis=-1) == 40 - 5).all()  # every non-candidate at the bound


def test_sled_premature_norm_reads_through_the_norm():
    layer_logits, embeddings = sled_case(seed=3)
    decision = run_sled(layer_logits, embeddings, norm=lambda h: 0.5 * h, premature_norm=True)
    premature = 0.5 * np.concatenate([embeddings[None], layer_logits[:-1]])
    # The final layer is decoded through the norm too, as the model decodes it.
    normed = layer_logits.copy()
    normed[-1] *= 0.5
    check_sled(decision, normed, premature)


def test_sled_ties_and_layers_that_agree_with_the_final_one():
    layer_logits, embeddings = sled_case(seed=5, layers=4, batch=3, vocab=12)
    layer_logits[-1, 0, :4] = 6.0  # four tied top tokens, all candidates (scale 4)
    layer_logits[:, 1] = layer_logits[-1, 1]  # row 1: every layer equals the final one
    embeddings[1] = layer_logits[-1, 1]
    layer_logits[1, 2] = layer_logits[-1, 2]  # row 2: one layer agrees, the others vote
    decision = run_sled(layer_logits, embeddings, evolution_scale=4, evolution_rate=1.0)
    premature = np.concatenate([embeddings[None], layer_logits[:-1]])
    check_sled(decision, layer_logits, premature, evolution_scale=4, evolution_rate=1.0)
    assert np.array(decision.extras["evolved_tokens"])[1] == 0  # nobody pulled in row 1
    # With no pull, the step only lowers each candidate by rate * its probability.
    top = np.argsort(-layer_logits[-1, 1], kind="stable")[:4]
    p = np.exp(np_log_softmax(layer_logits[-1, 1]))
    np.testing.assert_allclose(
        np.array(decision.logits)[1, top], layer_logits[-1, 1, top] - p[top], rtol=1e-5
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"layers": []}, "at least one premature layer"),
        ({"evolution_rate": -1.0}, "evolution_rate"),
        ({"evolution_scale": 0}, "evolution_scale"),
        ({"layers": "high"}, "layers"),
        ({"alpha": 0.5}, "unknown parameter 'alpha'"),
    ],
)
def test_sled_rejects_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy("sled", **params)


def test_sled_layers_out_of_range():
    strategy = get_strategy("sled", layers=[2, 6])
    with pytest.raises(ConfigError, match=r"premature layers \[6\] are out of range"):
        strategy.prepare(ModelFacts(6, True, "test"))
