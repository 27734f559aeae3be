"""The logit lens on a tiny random llama: the last layer must be the model's own output."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from layerdecode import lens, plots
from layerdecode.errors import ConfigError
from layerdecode.testing import tiny_model


class _Tokenizer:
    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def model():
    # Unscaled weights and 200 tokens: the model these tests' positions were picked on.
    return tiny_model(
        "llama", num_layers=4, intermediate_size=128, vocab_size=200, weight_scale=1.0
    )


IDS = [1, 17, 42, 99, 3, 150, 7, 8, 120, 64, 5]


def test_last_layer_equals_model_logits(model):
    result = lens.logit_lens(model, _Tokenizer(), IDS)
    logits = model(mx.array(IDS)[None])[0].astype(mx.float32)
    probs = np.array(mx.softmax(logits, axis=-1))
    assert result.layers == [0, 1, 2, 3]
    assert result.top_ids.shape == (4, len(IDS))
    np.testing.assert_array_equal(result.top_ids[-1], probs.argmax(-1))
    np.testing.assert_allclose(result.probs[-1], probs.max(-1), rtol=1e-4, atol=1e-6)
    expected_entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1)
    np.testing.assert_allclose(result.entropies[-1], expected_entropy, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(result.final_top_ids, result.top_ids[-1])
    assert result.tokens == [f"t{i}" for i in IDS]
    assert result.top_tokens[-1][0] == f"t{result.top_ids[-1, 0]}"


def test_layers_subset_negative_and_chunking(model, monkeypatch):
    full = lens.logit_lens(model, _Tokenizer(), IDS)
    monkeypatch.setattr(lens, "_CHUNK_ELEMENTS", 200 * 3)  # three rows per chunk
    part = lens.logit_lens(model, _Tokenizer(), IDS, layers=[1, -3, 2])
    assert part.layers == [1, 2]
    np.testing.assert_array_equal(part.top_ids, full.top_ids[1:3])
    np.testing.assert_allclose(part.entropies, full.entropies[1:3], rtol=1e-5, atol=1e-6)
    # The final layer's top ids are known even when its row is not requested.
    np.testing.assert_array_equal(part.final_top_ids, full.top_ids[-1])


def test_mlx_and_numpy_paths_agree(model, monkeypatch):
    fast = lens.logit_lens(model, _Tokenizer(), IDS)
    monkeypatch.setattr(lens, "_numpy_head", lambda adapter: None)
    slow = lens.logit_lens(model, _Tokenizer(), IDS)
    np.testing.assert_array_equal(fast.top_ids, slow.top_ids)
    np.testing.assert_allclose(fast.probs, slow.probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.entropies, slow.entropies, rtol=1e-3, atol=1e-4)


def test_bad_layers(model):
    with pytest.raises(ConfigError, match="out of range"):
        lens.logit_lens(model, _Tokenizer(), IDS, layers=[4])
    with pytest.raises(ConfigError, match="at least one token"):
        lens.logit_lens(model, _Tokenizer(), [])


def test_chosen_layers_and_disagreements(model):
    full = lens.logit_lens(model, _Tokenizer(), IDS)
    # Find a position where layer 0 disagrees with the final layer and one where it agrees.
    differs = [p for p in range(len(IDS)) if full.top_ids[0, p] != full.top_ids[-1, p]]
    assert differs
    result = lens.logit_lens(
        model, _Tokenizer(), IDS, chosen_layers={differs[0]: 0, 1: 3}, prompt_length=5
    )
    assert result.chosen_layers[differs[0]] == 0
    assert result.chosen_layers[1] == 3
    assert (differs[0], 0) in result.disagreements()
    assert all(layer != 3 for _, layer in result.disagreements())
    seq = lens.logit_lens(model, _Tokenizer(), IDS, chosen_layers=[None, -1, 2])
    assert seq.chosen_layers.tolist()[:3] == [-1, 3, 2]
    assert seq.to_dict()["chosen_layers"][1] == 3


def test_plot_and_html(model, tmp_path):
    import matplotlib.image as mpimg

    result = lens.logit_lens(model, _Tokenizer(), IDS, chosen_layers={6: 1, 7: 3}, prompt_length=7)
    for color in ("entropy", "prob"):
        path = plots.plot_lens(result, tmp_path / f"{color}.png", color=color)
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ConfigError, match="Unknown colour"):
        plots.plot_lens(result, tmp_path / "x.png", color="rainbow")
    page = plots.lens_html(result)
    assert page.count("<tr>") == 1 + len(result.layers)
    assert "t1" in page


def test_short_token():
    assert plots.short_token("hello world", 6) == "hello…"
    assert plots.short_token("\n") == "\\n"
    assert plots.short_token(" ab") == " ab"
    assert plots.short_token("  ") == "··"
