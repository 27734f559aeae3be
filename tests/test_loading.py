"""load(): named models, .gguf files, local mlx-lm directories; dtypes; real-model answers."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest

from layerdecode.errors import ModelError
from layerdecode.loading import DEFAULT_MODEL, load
from tests.gguf_files import write_tiny_gguf


@pytest.mark.real_model
def test_default_model_answers_the_capital_of_france(smollm2):
    from mlx_lm import generate

    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt, max_tokens=20)
    assert text == "The capital of France is Paris."


@pytest.mark.real_model
def test_cached_default_model_loads_fast(smollm2):
    start = time.perf_counter()
    model, _ = load(None)
    elapsed = time.perf_counter() - start
    assert DEFAULT_MODEL == "smollm2-135m-instruct" and len(model.layers) == 30
    # About 1 s on an idle 2-core box; the bound only catches a reconversion.
    assert elapsed < 10, f"cached load took {elapsed:.1f}s"


@pytest.mark.real_model
def test_gemma_3_continues_about_paris():
    from mlx_lm import generate

    model, tokenizer = load("gemma-3-270m")
    assert len(model.layers) == 18
    text = generate(model, tokenizer, "The Eiffel Tower is located in the city of", max_tokens=10)
    assert "Paris" in text
    # The base model greedily says " the capital of ..." first; Paris is among its top 3.
    logits = model(mx.array([tokenizer.encode("The capital of France is")]))[0, -1]
    top = [tokenizer.decode([t]) for t in mx.argsort(-logits)[:3].tolist()]
    assert " Paris" in top


def _tiny_llama_dir(path):
    """An mlx-lm directory written by mlx-lm's own save functions, as on the Hub."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    config |= dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    config |= dict(vocab_size=256, tie_word_embeddings=True)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    vocab = {chr(i + 0x100 if i < 33 else i): i for i in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(path))
    return model


def test_local_mlx_lm_directory(tmp_path):
    original = _tiny_llama_dir(tmp_path)
    ids = mx.array([[1, 2, 3, 4]])
    model, _ = load(str(tmp_path), dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(model(ids).astype(mx.float32)), np.array(original(ids).astype(mx.float32))
    )
    model, _ = load(tmp_path, dtype="float32")
    assert model.model.embed_tokens.weight.dtype == mx.float32


def test_gguf_path_and_dtypes(tmp_path):
    import mlx.nn as nn

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quant="Q8_0")
    model, _ = load(str(path), dtype="quantized")
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    model, _ = load(path, dtype="float16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float16


def test_bad_names(tmp_path):
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m-instruct'"):
        load("smollm2-135m")
    with pytest.raises(ModelError, match="not found"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="Unknown dtype"):
        load(str(tmp_path / "missing.gguf"), dtype="int3")
    with pytest.raises(ModelError, match="Could not load"):
        load(str(tmp_path))  # an empty directory is not an mlx-lm model
