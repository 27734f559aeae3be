"""Import ``.gguf`` files as mlx-lm models.

A GGUF file carries everything an mlx-lm model directory does: the config (as metadata), the
weights (under llama.cpp names, some quantised) and the tokenizer (vocabulary, merges or scores,
special tokens, chat template). This module maps each of them onto mlx-lm's conventions:

* weights: llama.cpp tensor names -> mlx-lm names; the Q/K row permutation that llama.cpp's
  converter applies to llama models is undone; Gemma's "1 + weight" norms are shifted back.
* quantisation: Q4_0, Q4_1 and Q8_0 blocks are repacked losslessly into MLX affine triplets
  (weight/scales/biases, group size 32, bits per tensor); every other type is dequantised with
  the ``gguf`` package.
* tokenizer: rebuilt as a ``tokenizers`` BPE model (GPT-2 style byte-level, or SentencePiece
  style with merges derived from the scores) inside a transformers fast tokenizer.

``load_gguf`` builds the model in memory; ``convert_gguf`` writes an mlx-lm model directory that
``mlx_lm.load`` reads as well.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerdecode.dtypes import DTYPES as DTYPES  # re-exported: callers read gguf.DTYPES
from layerdecode.dtypes import check_dtype
from layerdecode.errors import ModelError, UnsupportedModelError

# GGUF ``general.architecture`` -> mlx-lm ``model_type``.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# Tensor types MLX represents natively (affine, group size 32): type name -> bits.
_NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_FLOAT_TYPES = ("F32", "F16")
_GROUP_SIZE = 32

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has a norm on each side of both sublayers.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (the ones llama.cpp uses).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_PATTERNS = {
    "llama-bpe": [_LLAMA3_PATTERN],
    "llama3": [_LLAMA3_PATTERN],
    "smaug-bpe": [_LLAMA3_PATTERN],
    "qwen2": [_QWEN2_PATTERN],
    "deepseek-r1-qwen": [_QWEN2_PATTERN],
    # StarCoder-lineage vocabularies split every digit first.
    "smollm": [r"\p{N}", _GPT2_PATTERN],
    "starcoder": [r"\p{N}", _GPT2_PATTERN],
    "refact": [r"\p{N}", _GPT2_PATTERN],
}

# llama.cpp token types.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 3, 4, 5, 6


@dataclass
class GGUFModel:
    """What a GGUF file holds, in mlx-lm terms (arrays are numpy until the model is built)."""

    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    tokenizer: Any  # transformers.PreTrainedTokenizerFast


def load_gguf(path: str | os.PathLike, *, dtype: str | None = None):
    """Load a ``.gguf`` file as ``(model, TokenizerWrapper)``.

    ``dtype`` is ``"quantized"`` (default: Q4_0/Q4_1/Q8_0 tensors stay quantised, the rest is
    float16) or one of ``"float32"``, ``"float16"``, ``"bfloat16"`` (everything dequantised).
    """
    contents = read_gguf(path, dtype=dtype)
    model = build_model(contents.config, contents.weights, dtype=dtype)
    return model, wrap_tokenizer(contents.tokenizer)


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Write ``gguf_path`` as an mlx-lm model directory at ``out_dir`` and return its path.

    The directory is written next to ``out_dir`` under a temporary name and renamed into place
    once complete, so a failure never leaves a half-written model behind. An existing
    ``out_dir`` is replaced.
    """
    from mlx_lm.utils import save_config, save_model

    out_dir = Path(out_dir)
    contents = read_gguf(gguf_path, dtype=dtype)
    model = build_model(contents.config, contents.weights, dtype=dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_model(tmp, model, donate_model=True)
        save_config(dict(contents.config), tmp / "config.json")
        contents.tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_gguf(path: str | os.PathLike, *, dtype: str | None = None) -> GGUFModel:
    """Read config, mlx-lm-named weights and tokenizer from a GGUF file."""
    # A GGUF read on its own keeps its native quantisation unless told otherwise.
    dtype = check_dtype("quantized" if dtype is None else dtype)
    reader = _open(path)
    arch = _architecture(reader, path)
    config = _config(reader, arch, path)
    weights = _weights(reader, arch, config, dtype, path)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    quantised = {k[: -len(".scales")]: v for k, v in weights.items() if k.endswith(".scales")}
    if quantised:
        config["quantization"] = _quantization_config(weights, quantised)
    return GGUFModel(config, weights, _tokenizer(reader, path))


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """The mlx-lm config of a GGUF file and how many tensors it holds of each type."""
    reader = _open(path)
    arch = _architecture(reader, path)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.kind] = types.get(tensor.kind, 0) + 1
    return _config(reader, arch, path), types


def build_model(config: dict[str, Any], weights: dict[str, np.ndarray], dtype: str | None = None):
    """Instantiate the mlx-lm model class for ``config``, load ``weights``, cast float ``dtype``."""
    import mlx.core as mx
    import mlx.nn as nn

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    arrays = {k: mx.array(v) for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        arrays = model.sanitize(arrays)
    quantization = config.get("quantization")
    if quantization:

        def predicate(path, layer):
            if path in quantization:
                return quantization[path]
            return hasattr(layer, "to_quantized") and f"{path}.scales" in arrays

        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=predicate,
        )
    model.load_weights(list(arrays.items()), strict=True)
    if dtype in ("float32", "float16", "bfloat16"):
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    model.eval()
    return model


def wrap_tokenizer(tokenizer):
    """Wrap a transformers fast tokenizer as mlx-lm's ``TokenizerWrapper``."""
    from functools import partial

    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        SPMStreamingDetokenizer,
        TokenizerWrapper,
    )

    decoder = tokenizer.backend_tokenizer.decoder.__class__.__name__
    if decoder == "ByteLevel":
        detokenizer = BPEStreamingDetokenizer
    else:
        detokenizer = partial(SPMStreamingDetokenizer, trim_space=False)
    return TokenizerWrapper(tokenizer, detokenizer)


# -- reading -------------------------------------------------------------------------------

# GGUF metadata value types: scalar struct formats, then string (8) and array (9).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]  # ggml order: the row length first
    kind: str  # tensor type name, e.g. "Q4_K"
    data: np.ndarray  # raw bytes (quantised) or values (float), rows x row length


@dataclass
class _File:
    fields: dict[str, Any]
    tensors: list[_Tensor]


def _open(path: str | os.PathLike) -> _File:
    """Parse a GGUF file: metadata fully, tensors as views into a read-only memory map."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        return _parse(buffer, path)
    except ModelError:
        raise
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"{path} is not a readable GGUF file (truncated or corrupt?): {reason}"
        raise ModelError(message) from None


def _parse(buffer: np.ndarray, path: Path) -> _File:
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = memoryview(buffer)
    position = 0

    def take(fmt: str):
        nonlocal position
        value = struct.unpack_from(fmt, raw, position)
        position += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal position
        size = take("<Q")
        if position + size > len(raw):
            raise ValueError("string runs past the end of the file")
        position += size
        return bytes(raw[position - size : position]).decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal position
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = take("<I"), take("<Q")
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item])
            items = np.frombuffer(raw, dtype, count, position)
            position += dtype.itemsize * count
            return items.tolist()
        return [value(item) for _ in range(count)]

    if len(raw) < 24 or bytes(raw[:4]) != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (bad magic number).")
    position = 4
    version, tensor_count, field_count = take("<I"), take("<Q"), take("<Q")
    if version not in (2, 3):
        raise UnsupportedModelError(f"GGUF version {version} of {path} is not supported.")
    fields = {}
    for _ in range(field_count):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(tensor_count):
        name = string()
        dims = tuple(take("<Q") for _ in range(take("<I")))
        infos.append((name, dims, take("<I"), take("<Q")))
    alignment = int(fields.get("general.alignment", 32))
    start = -(-position // alignment) * alignment

    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            kind = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"GGUF tensor type {type_id} (tensor {name!r} in {path}) is not supported."
            ) from None
        block, size = GGML_QUANT_SIZES[kind]
        row = dims[0] // block * size
        shape = tuple(reversed(dims[1:])) + (row,)
        begin = start + offset
        end = begin + int(np.prod(shape))
        if end > len(buffer):
            raise ModelError(f"{path} is truncated: tensor {name!r} runs past the end of the file.")
        data = buffer[begin:end].reshape(shape)
        if kind.name in _FLOAT_TYPES:
            data = data.view(np.float32 if kind.name == "F32" else np.float16)
        tensors.append(_Tensor(name, dims, kind.name, data))
    return _File(fields, tensors)


_MISSING = object()


def _metadata(reader, key: str, default: Any = _MISSING, *, path=None) -> Any:
    if key not in reader.fields:
        if default is _MISSING:
            raise ModelError(f"GGUF file {path} lacks the metadata key {key!r}.")
        return default
    return reader.fields[key]


def _architecture(reader, path) -> str:
    arch = _metadata(reader, "general.architecture", path=path)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {path} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}."
        )
    return arch


def _config(reader, arch: str, path) -> dict[str, Any]:
    def meta(key, default=_MISSING):
        return _metadata(reader, f"{arch}.{key}", default, path=path)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = _metadata(reader, "tokenizer.ggml.tokens", path=path)
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "vocab_size": len(tokens),
    }
    scaling = meta("rope.scaling.type", None)
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} in {path} is not supported.")
    if arch == "gemma3":
        # llama.cpp fixes these for Gemma 3 rather than storing them.
        config["query_pre_attn_scalar"] = config["head_dim"]
        config["sliding_window"] = int(meta("attention.sliding_window", 512))
        config["sliding_window_pattern"] = 6
        config["rope_local_base_freq"] = 10000.0
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = _metadata(reader, f"tokenizer.ggml.{name}_token_id", None)
        if value is not None:
            config[key] = int(value)
    return config


def _weights(reader, arch: str, config: dict, dtype: str, path) -> dict[str, np.ndarray]:
    names = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
    float_dtype = np.float16 if dtype == "quantized" else np.float32
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _mlx_name(tensor.name, names, path)
        if dtype == "quantized" and tensor.kind in _NATIVE_BITS and name.endswith(".weight"):
            arrays = _repack(tensor.data, tensor.kind, _rows(tensor))
        else:
            arrays = {"weight": _dequantise(tensor, path).astype(float_dtype)}
        if arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp stores Gemma norms as 1 + w; mlx-lm adds the 1 itself.
            arrays["weight"] = arrays["weight"] - np.asarray(1.0, arrays["weight"].dtype)
        if arch == "llama" and re.search(r"self_attn\.[qk]_proj\.weight$", name):
            key_heads = ".k_proj." in name
            heads = config["num_key_value_heads" if key_heads else "num_attention_heads"]
            arrays = {k: _unpermute_rows(v, heads) for k, v in arrays.items()}
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is None:
            weights[name] = arrays["weight"]
        else:
            weights.update({f"{prefix}.{part}": array for part, array in arrays.items()})
    return weights


def _mlx_name(name: str, block_names: dict[str, str], path) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match:
        layer, part, kind = match.groups()
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{kind}"
    else:
        stem, _, kind = name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and kind in ("weight", "bias"):
            return f"{_TOP_LEVEL_NAMES[stem]}.{kind}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} in {path} is not supported.")


def _rows(tensor) -> tuple[int, int]:
    return int(np.prod(tensor.dims[1:])), int(tensor.dims[0])


def _dequantise(tensor: _Tensor, path) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = tensor.kind
    if kind in _FLOAT_TYPES:
        return np.asarray(tensor.data)
    try:
        return dequantize(np.asarray(tensor.data), GGMLQuantizationType[kind])
    except NotImplementedError:
        raise UnsupportedModelError(
            f"GGUF tensor type {kind} (tensor {tensor.name!r} in {path}) is not supported."
        ) from None


def _repack(data: np.ndarray, kind: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Repack Q4_0/Q4_1/Q8_0 blocks as MLX affine weight/scales/biases, losslessly."""
    rows, cols = shape
    blocks = np.asarray(data).reshape(rows, cols // _GROUP_SIZE, -1)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        # int8 q -> unsigned q + 128, so value = d * (q + 128) - 128 d.
        values = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = scales * np.float16(-128)
        packed = values.reshape(rows, cols).view(np.uint32)
    else:
        offset = 4 if kind == "Q4_1" else 2
        nibbles = blocks[..., offset:]
        # GGUF keeps elements 0..15 in the low nibbles, 16..31 in the high ones.
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
        packed = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8).view(np.uint32)
        if kind == "Q4_1":
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            biases = scales * np.float16(-8)
    return {"weight": packed, "scales": scales, "biases": biases}


def _unpermute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleaving (it converts rotary halves to pairs)."""
    rows = array.shape[0]
    permuted = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return array[np.argsort(permuted)]


def _quantization_config(weights: dict, quantised: dict[str, np.ndarray]) -> dict[str, Any]:
    bits = {}
    for prefix, scales in quantised.items():
        cols = scales.shape[-1] * _GROUP_SIZE
        bits[prefix] = weights[f"{prefix}.weight"].shape[-1] * 32 // cols
    default = max(set(bits.values()), key=list(bits.values()).count)
    config: dict[str, Any] = {"group_size": _GROUP_SIZE, "bits": default, "mode": "affine"}
    for prefix, value in sorted(bits.items()):
        if value != default:
            config[prefix] = {"group_size": _GROUP_SIZE, "bits": value}
    return config


# -- tokenizer ------------------------------------------------------------------------------


def _tokenizer(reader, path):
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    def meta(key, default=None):
        return _metadata(reader, f"tokenizer.ggml.{key}", default)

    kind = meta("model")
    tokens = list(meta("tokens"))
    types = list(meta("token_type", [_NORMAL] * len(tokens)))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(tokens, meta("merges", []), meta("pre", "default"))
    elif kind == "llama":
        scores = list(meta("scores"))
        tokenizer = Tokenizer(_sentencepiece_bpe(tokens, scores, types, meta("unknown_token_id")))
        _sentencepiece_text_rules(tokenizer, bool(meta("add_space_prefix", True)))
    else:
        raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} in {path} is not supported.")

    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _USER_DEFINED
        ]
    )

    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        index = meta(f"{name}_token_id")
        if index is not None and 0 <= int(index) < len(tokens):
            special[name] = tokens[int(index)]
    add_bos = bool(meta("add_bos_token", False)) and "bos" in special
    if add_bos:
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokens.index(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special.get("bos"),
        eos_token=special.get("eos"),
        unk_token=special.get("unknown"),
        pad_token=special.get("padding"),
        add_bos_token=add_bos,
        clean_up_tokenization_spaces=False,
        chat_template=_metadata(reader, "tokenizer.chat_template", None),
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    steps = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        for pattern in _PRE_TOKENIZER_PATTERNS.get(pre, [_GPT2_PATTERN])
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], unk_id):
    """SentencePiece BPE: merge the adjacent pair whose joined piece scores highest."""
    from tokenizers import models

    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for token, index in mergeable.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[index], mergeable[left], mergeable[right], left, right))
    ranked.sort()
    unk = tokens[int(unk_id)] if unk_id is not None else None
    return models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )


def _sentencepiece_text_rules(tokenizer, add_space_prefix: bool) -> None:
    from tokenizers import decoders, normalizers

    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decoding.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decoding)
