"""Tiny GGUF files and fake model wheels written for the tests (no downloads)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 64, 4, 2, 260


def byte_vocab() -> list[str]:
    """GPT-2 byte-to-unicode alphabet: 256 single-byte tokens, then specials."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)] + ["<s>", "</s>", "<unk>", "<pad>"]


def write_tiny_gguf(
    path: Path, *, arch: str = "llama", quant: str | None = None, seed: int = 0
) -> Path:
    """A one-layer llama-style GGUF with a byte-level BPE vocabulary.

    ``quant`` ("Q8_0", "Q4_0"...) quantises the MLP weights with the ``gguf`` package.
    """
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    tokens = byte_vocab()
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * 4)
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_add_bos_token(False)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = HIDDEN // HEADS
    tensors = {
        "token_embd.weight": weight(VOCAB, HIDDEN),
        "output_norm.weight": 1 + weight(HIDDEN),
        "blk.0.attn_norm.weight": 1 + weight(HIDDEN),
        "blk.0.ffn_norm.weight": 1 + weight(HIDDEN),
        "blk.0.attn_q.weight": weight(HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": weight(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_v.weight": weight(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_output.weight": weight(HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": weight(FFN, HIDDEN),
        "blk.0.ffn_up.weight": weight(FFN, HIDDEN),
        "blk.0.ffn_down.weight": weight(HIDDEN, FFN),
    }
    for name, array in tensors.items():
        if quant and ".ffn_" in name and not name.endswith("norm.weight"):
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal pure-Python wheel holding ``files``, as pip expects one."""
    module = package.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path
