"""Every architecture the installed mlx-lm ships decodes with layerdecode.

A tiny random-weight model of each (built from mlx-lm's own ``ModelArgs``, configs in
``layerdecode/tiny_architectures.json``): ``final`` gives mlx-lm's tokens, token for token;
``confident``, ``dola`` and ``sled`` decode from the layers the adapter found, which the
adapter check has compared with the model's own logits. A sample of families also decodes in
batches, each row as it does alone.
"""

from __future__ import annotations

import pytest

from layerdecode import generate
from layerdecode.adapters import get_adapter
from layerdecode.testing import (
    check_final_matches_mlx_lm,
    model_types,
    tiny_configs,
    tiny_model,
    tiny_tokenizer,
    unbuildable_architectures,
)

INSTALLED = set(model_types())
CONFIGS = tiny_configs()
PROMPT = [5, 17, 42, 8, 99, 23]
# The paper's own families must decode.
PAPER = {"qwen3_5", "qwen3_5_moe", "gemma4_text", "gpt_oss"}


def test_every_installed_architecture_is_accounted_for():
    unbuildable = unbuildable_architectures()
    assert not set(CONFIGS) & set(unbuildable)
    # A type added by a newer mlx-lm counts as not decoding until it has a config here.
    decoding = INSTALLED & set(CONFIGS)
    share = len(decoding) / len(INSTALLED)
    assert share >= 0.9, f"{len(decoding)} of {len(INSTALLED)} model types: {share:.0%}"
    assert decoding >= PAPER


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_architecture_decodes(arch):
    if arch not in INSTALLED:
        pytest.skip(f"{arch} is not in the installed mlx-lm")
    model = tiny_model(arch)
    tokenizer = tiny_tokenizer()
    check_final_matches_mlx_lm(model, tokenizer, PROMPT, max_tokens=6)
    adapter = get_adapter(model)
    final = adapter.num_layers - 1
    for name, params in (("confident", {"window": 4}), ("dola", {}), ("sled", {})):
        result = generate(model, tokenizer, PROMPT, strategy=name, params=params, max_tokens=3)
        assert result.finish_reason in ("stop", "length"), name
        assert len(result.layers) == len(result.tokens) <= 3, name
        assert all(0 <= layer <= final for layer in result.layers), (name, result.layers)
