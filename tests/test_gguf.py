"""GGUF import: weights against an independent numpy reference, tokenizer, quantisation, errors."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from layerdecode.errors import ModelError, UnsupportedModelError
from layerdecode.gguf import convert_gguf, load_gguf
from tests.gguf_files import write_tiny_gguf

# -- SmolLM2 against references built straight from the GGUF with the gguf package ----------


@pytest.fixture(scope="module")
def reader(smollm2_gguf):
    from gguf import GGUFReader

    return GGUFReader(smollm2_gguf)


def _tensor(reader, name):
    from gguf.quants import dequantize

    tensor = next(t for t in reader.tensors if t.name == name)
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def _reference_logits(reader, ids):
    """llama forward pass in numpy on the GGUF's own (permuted) Q/K rows and rotary layout."""
    field = reader.fields
    meta = {k: field[k].contents() for k in field if k.startswith("llama.")}
    heads, kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    embed = _tensor(reader, "token_embd.weight")
    dim = embed.shape[1] // heads

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # llama.cpp's layout after its row permutation: rotate adjacent pairs
        pos = np.arange(x.shape[1])[None, :, None]
        angle = pos * base ** (-np.arange(0, dim, 2) / dim)[None, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
        return out

    x = embed[ids].astype(np.float64)
    n = len(ids)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(meta["llama.block_count"]):

        def w(part, i=i):
            return _tensor(reader, f"blk.{i}.{part}.weight")

        h = rms(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(n, heads, dim).transpose(1, 0, 2))
        k = rope((h @ w("attn_k").T).reshape(n, kv, dim).transpose(1, 0, 2))
        v = (h @ w("attn_v").T).reshape(n, kv, dim).transpose(1, 0, 2)
        k, v = np.repeat(k, heads // kv, 0), np.repeat(v, heads // kv, 0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(dim) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(n, -1) @ w("attn_output").T
        h = rms(x, w("ffn_norm"))
        gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T
    return rms(x, _tensor(reader, "output_norm.weight")) @ embed.T


@pytest.mark.real_model
def test_smollm2_logits_match_numpy_reference(smollm2, reader):
    model, _ = smollm2
    ids = [1, 4093, 198, 1780, 314, 260, 3575]
    expected = _reference_logits(reader, ids)
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert got.shape == expected.shape == (len(ids), 49152)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def _byte_level_bpe(reader):
    """A plain BPE from the GGUF's merges, independent of the tokenizers library."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}

    def word(text):
        parts = [table[b] for b in text.encode()]
        while len(parts) > 1:
            pairs = [
                (ranks.get(p, 1e9), j) for j, p in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, j = min(pairs)
            if rank == 1e9:
                break
            parts[j : j + 2] = [parts[j] + parts[j + 1]]
        return [vocab[p] for p in parts]

    def encode(text):
        pieces = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+|\s+", text)
        return [i for piece in pieces for i in word(piece)]

    return encode


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_gguf_vocabulary(smollm2, reader):
    _, tokenizer = smollm2
    encode = _byte_level_bpe(reader)
    for text in ["Hello world", "The capital of France is Paris.", "It's 2024, don't panic!"]:
        assert tokenizer.encode(text) == encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    for text in ["naïve café ☕ 東京", "  spaced\n\nlines\t"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    start, end, newline = 1, 2, encode("\n")
    expected = [start, *encode("system\n" + system), end, *newline]
    expected += [start, *encode("user\n" + messages[0]["content"]), end, *newline]
    expected += [start, *encode("assistant\n")]
    assert ids == expected  # no BOS: the GGUF says add_bos_token = false


# -- tiny GGUF files ------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1"])
def test_native_quantisation_is_kept_losslessly(tmp_path, quant):
    import gguf
    import mlx.nn as nn

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quant=quant)
    model, _ = load_gguf(path, dtype="quantized")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == (8 if quant == "Q8_0" else 4)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    got = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), expected, rtol=1e-3, atol=1e-3)


def test_float_load_matches_quantised_load(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", quant="Q8_0")
    quantised, _ = load_gguf(path)
    full, tokenizer = load_gguf(path, dtype="float32")
    ids = mx.array([tokenizer.encode("hello there")])
    assert full.model.embed_tokens.weight.dtype == mx.float32
    got, expected = quantised(ids).astype(mx.float32), full(ids)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=0.05)


def test_convert_gguf_writes_an_mlx_lm_directory(tmp_path):
    from mlx_lm import load as mlx_load

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quant="Q4_0")
    out = convert_gguf(path, tmp_path / "out" / "tiny")
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary left
    model, tokenizer = mlx_load(str(out))
    direct, _ = load_gguf(path)
    ids = mx.array([tokenizer.encode("abc")])
    np.testing.assert_allclose(np.array(model(ids)), np.array(direct(ids)), atol=1e-5)


def test_failed_conversion_leaves_nothing(tmp_path):
    broken = write_tiny_gguf(tmp_path / "tiny.gguf")
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(ModelError):
        convert_gguf(broken, tmp_path / "out" / "tiny")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(ModelError) as error:
        load_gguf(tmp_path / "nope.gguf")
    assert "not found" in _one_line(error)


def test_truncated_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    for size in (len(data) - 1000, 300, 10):
        path.write_bytes(data[:size])
        with pytest.raises(ModelError) as error:
            load_gguf(path)
        assert str(path) in _one_line(error)
        assert not isinstance(error.value, UnsupportedModelError)


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelError) as error:
        load_gguf(path)
    assert "not a GGUF file" in _one_line(error)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedModelError) as error:
        load_gguf(path)
    assert "'mamba'" in _one_line(error)
