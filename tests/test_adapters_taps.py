"""Adapters decode the last layer exactly as the model does; taps are transparent."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from layerdecode.adapters import get_adapter
from layerdecode.errors import UnsupportedModelError
from layerdecode.taps import install_taps
from layerdecode.testing import TINY_ARCHITECTURES, tiny_model

IDS = mx.array([[3, 17, 42, 8, 99, 5, 23, 61]])


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_adapter_reproduces_model_logits(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    taps = install_taps(adapter.layers)
    with taps.capture() as capture:
        logits = model(IDS)
    assert all(out is not None for out in capture.outputs)
    assert capture.embeddings is not None
    decoded = adapter.decode(capture.outputs[-1])
    assert mx.array_equal(decoded, logits).item()
    # An earlier layer decodes to something else (the layers are not identities).
    assert not mx.allclose(adapter.decode(capture.outputs[0]), logits).item()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_moe"])
def test_taps_are_transparent(arch):
    model = tiny_model(arch)
    before = dict(tree_flatten(model.parameters()))
    reference = model(IDS)
    layer = model.model.layers[0]
    original_class = type(layer)
    attributes = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
    taps = install_taps(get_adapter(model).layers)
    assert isinstance(layer, original_class)
    assert type(layer).__name__ == original_class.__name__
    assert {k: v for k, v in vars(layer).items() if not k.startswith("_")} == attributes
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    # Weights load into the tapped model by the same names.
    model.load_weights(list(after.items()))
    # Outside a capture the model computes exactly what it did before; nothing is recorded.
    assert mx.array_equal(model(IDS), reference).item()
    # Installing twice keeps one tap per layer.
    install_taps(get_adapter(model).layers)
    assert type(layer).__mro__.count(original_class) == 1
    assert type(type(layer).__mro__[1]) is type and type(layer).__mro__[1] is original_class
    taps.remove()
    assert type(layer) is original_class


def test_sliding_window_attributes_still_read_by_mlx_lm():
    # gemma3_text builds rotating caches from its config and masks from layer positions;
    # llama reads layer.use_sliding. Both must work with taps installed.
    from mlx_lm.models.cache import make_prompt_cache

    for arch in ("gemma3_text", "llama"):
        model = tiny_model(arch)
        install_taps(get_adapter(model).layers)
        cache = make_prompt_cache(model)
        out = model(IDS, cache=cache)
        assert out.shape == (1, IDS.shape[1], 211)


def test_a_model_without_a_layer_list_is_named():
    import mlx.nn as nn

    class Headless(nn.Module):
        model_type = "headless"

        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="no list of decoder layers") as err:
        get_adapter(Headless())
    assert "'headless'" in str(err.value) and "\n" not in str(err.value)


def test_the_check_refuses_a_broken_adapter(monkeypatch):
    from layerdecode import adapters

    # A model whose forward scales its logits, with the rule that says so taken away.
    model = tiny_model("cohere")
    monkeypatch.delitem(adapters.LOGIT_RULES, "cohere")
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("Model type 'cohere' cannot be decoded layer by layer")
    assert "differs from the model's own logits by" in message


def test_a_norm_not_found_is_not_guessed(monkeypatch):
    # Without its final norm the layout is wrong; the check says so rather than decoding.
    from layerdecode import adapters

    monkeypatch.setattr(adapters, "NORM_NAMES", ("final_layernorm",))
    with pytest.raises(UnsupportedModelError, match="cannot be decoded layer by layer") as err:
        get_adapter(tiny_model("llama"))
    assert "norm none" in str(err.value)


def test_the_adapter_is_found_again_when_a_module_is_replaced():
    import mlx.nn as nn

    model = tiny_model("llama-untied")
    first = get_adapter(model)
    assert get_adapter(model) is first
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p == "lm_head")
    second = get_adapter(model)
    assert second is not first and isinstance(second.head, nn.QuantizedLinear)
