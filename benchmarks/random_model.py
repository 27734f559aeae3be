"""Random-weight mlx-lm models of real sizes, for benchmarks where nothing can be downloaded.

Speed depends on shapes, not on weights, so a model built from the published configuration
of a real checkpoint times like it. The tokenizer maps token ``i`` to the word ``t<i>``.
"""

from __future__ import annotations

import importlib

SHAPES = {
    # Qwen2.5-1.5B-Instruct's configuration: tied head, large vocabulary.
    "qwen1.5b": (
        "qwen2",
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
        ),
    ),
    # Meta-Llama-3-8B's configuration: untied head.
    "llama8b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=5e5,
        ),
    ),
    # A shape small enough for any CPU: checks the plumbing, times nothing.
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=12,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=1000,
            tie_word_embeddings=True,
        ),
    ),
}


def random_model(name: str, dtype: str = "bfloat16", seed: int = 0):
    """``(model, tokenizer)`` of the named shape with random weights in ``dtype``."""
    import mlx.core as mx

    if name not in SHAPES:
        raise SystemExit(f"Unknown random model '{name}': choose one of {', '.join(SHAPES)}.")
    module_name, config = SHAPES[name]
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(model_type=module_name, **config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model, word_tokenizer(config["vocab_size"])


def word_tokenizer(vocab_size: int):
    """An mlx-lm tokenizer whose token ``i`` is the word ``t<i>``, with no end-of-sequence."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    wrapper = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tokenizer))
    wrapper._eos_token_ids = set()  # fixed-length runs
    return wrapper


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """``length`` token ids drawn uniformly (never 0), the same for the same seed."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, vocab_size) for _ in range(length)]
