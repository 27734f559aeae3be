"""Every architecture the installed mlx-lm ships decodes with layerdecode.

A tiny random-weight model of each (built from mlx-lm's own ``ModelArgs``, configs in
``layerdecode/tiny_architectures.json``): ``final`` gives mlx-lm's tokens, token for token;
``confident``, ``dola`` and ``sled`` decode from the layers the adapter found, which the
adapter check has compared with the model's own logits. A sample of families also decodes in
batches, each row as it does alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import pytest

from layerdecode import generate
from layerdecode.adapters import get_adapter
from layerdecode.errors import UnsupportedModelError
from layerdecode.testing import (
    check_final_matches_mlx_lm,
    model_types,
    refused_architectures,
    tiny_configs,
    tiny_model,
    tiny_tokenizer,
    unbuildable_architectures,
)

INSTALLED = set(model_types())
CONFIGS = tiny_configs()
REFUSED = refused_architectures()
PROMPT = [5, 17, 42, 8, 99, 23]
# The paper's own families must decode.
PAPER = {"qwen3_5", "qwen3_5_moe", "gemma4_text", "gpt_oss"}


def test_every_installed_architecture_is_accounted_for():
    unbuildable = unbuildable_architectures()
    assert not set(CONFIGS) & set(unbuildable)
    assert set(REFUSED) <= set(CONFIGS)
    # A type added by a newer mlx-lm counts as not decoding until it has a config here.
    decoding = INSTALLED & (set(CONFIGS) - set(REFUSED))
    share = len(decoding) / len(INSTALLED)
    assert share >= 0.9, f"{len(decoding)} of {len(INSTALLED)} model types: {share:.0%}"
    assert decoding >= PAPER


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_architecture_decodes(arch):
    if arch not in INSTALLED:
        pytest.skip(f"{arch} is not in the installed mlx-lm")
    model = tiny_model(arch)
    tokenizer = tiny_tokenizer()
    if arch in REFUSED:
        # mlx-lm runs it; layerdecode says in one line why it cannot decode its layers.
        with pytest.raises(UnsupportedModelError) as err:
            get_adapter(model)
        assert f"Model type '{arch}'" in str(err.value) and "\n" not in str(err.value)
        return
    check_final_matches_mlx_lm(model, tokenizer, PROMPT, max_tokens=6)
    adapter = get_adapter(model)
    final = adapter.num_layers - 1
    for name, params in (("confident", {"window": 4}), ("dola", {}), ("sled", {})):
        result = generate(model, tokenizer, PROMPT, strategy=name, params=params, max_tokens=3)
        assert result.finish_reason in ("stop", "length"), name
        assert len(result.layers) == len(result.tokens) <= 3, name
        assert all(0 <= layer <= final for layer in result.layers), (name, result.layers)


# Hybrid stacks (gated delta, Mamba, sliding windows, KV sharing), MoE and MLA.
BATCHED = [
    "qwen3_5",
    "qwen3_next",
    "nemotron_h",
    "gpt_oss",
    "gemma4_text",
    "deepseek_v3",
    "falcon_h1",
    "lfm2",
]


# mlx-lm's own batches of these differ from their single runs: the shorter prompts are
# left-padded, and the padding runs through the Mamba convolution and state, which are not
# masked. layerdecode's rows then equal mlx-lm's batched rows instead.
PADDING_REACHES_THE_STATE = {"nemotron_h", "falcon_h1", "mamba", "mamba2", "jamba"}


def mlx_lm_batch_rows(model, prompts, n):
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=[], max_tokens=n)
    uids = generator.insert(prompts, [n] * len(prompts))
    rows = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for response in responses:
            rows[response.uid].append(response.token)
    return [rows[uid] for uid in uids]


@pytest.mark.parametrize("arch", BATCHED)
@pytest.mark.parametrize("name, params", [("final", {}), ("confident", {"window": 4})])
def test_batched_rows_equal_single_runs(arch, name, params):
    from .test_batch import batch_rows, prompts_of_lengths, single_runs

    if arch not in CONFIGS:
        pytest.fail(f"{arch} has no tiny config")
    model = tiny_model(arch)
    prompts = prompts_of_lengths(3, 9, 5)
    rows = batch_rows(model, prompts, name, params, 5)
    if name == "final":
        assert [[t for t, _, _ in row] for row in rows] == mlx_lm_batch_rows(model, prompts, 5)
    single = single_runs(model, prompts, name, params, 5)
    if arch in PADDING_REACHES_THE_STATE:
        assert rows[1] == single[1]  # the longest prompt has no padding
    else:
        assert rows == single


def test_the_docs_table_says_what_decodes():
    text = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (yes|untested|no: refused) \|", text, re.M))
    assert set(rows) == set(CONFIGS) | set(unbuildable_architectures())
    for name, status in rows.items():
        if name in REFUSED:
            assert status == "no: refused", name
        elif name in CONFIGS:
            assert status == "yes", name
        else:
            assert status == "untested", name


def test_a_head_split_over_the_vocabulary_is_gathered():
    # mlx-lm's qwen3_5 splits its head's rows across the ranks of a tensor-parallel group and
    # gathers the logits; the adapter gathers every decoded layer the same way. On a group of
    # one the gather is exact, so the split model decodes as the whole one.
    tokenizer = tiny_tokenizer()
    whole = generate(tiny_model("qwen3_5"), tokenizer, PROMPT, strategy="confident", max_tokens=5)
    model = tiny_model("qwen3_5")
    model.shard(mx.distributed.init())
    assert get_adapter(model).layout["logits"] == "gathered"
    split = generate(model, tokenizer, PROMPT, strategy="confident", max_tokens=5)
    assert (split.tokens, split.layers) == (whole.tokens, whole.layers)
