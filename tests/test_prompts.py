"""Prompt building, one function for the CLI, eval and the server."""

from __future__ import annotations

import pytest

from layerdecode.errors import ConfigError
from layerdecode.prompts import build_prompt, encode_prompt, has_chat_template
from layerdecode.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def words(tokenizer, ids):
    return tokenizer.decode(ids).split()


def test_chat_template_with_system(tokenizer):
    assert has_chat_template(tokenizer)
    ids = build_prompt(tokenizer, "w7 w8", system="w9")
    # The tiny vocabulary has no "<system>" word: it reads as "<unk>".
    assert words(tokenizer, ids) == ["<unk>", "w9", "<user>", "w7", "w8", "<assistant>"]


def test_messages_and_text_agree(tokenizer):
    text = build_prompt(tokenizer, "w7 w8")
    messages = build_prompt(tokenizer, [{"role": "user", "content": "w7 w8"}])
    assert text == messages


def test_raw_text_is_encoded_as_mlx_lm_does(tokenizer):
    raw = build_prompt(tokenizer, "w7 w8", system="w9", chat=False)
    assert raw == encode_prompt(tokenizer, "w9\n\nw7 w8").tolist()
    assert words(tokenizer, raw) == ["w9", "w7", "w8"]  # no chat markers


@pytest.mark.parametrize("prompt, message", [("  ", "The prompt is empty"), ([], "no messages")])
def test_empty_prompts(tokenizer, prompt, message):
    with pytest.raises(ConfigError, match=message):
        build_prompt(tokenizer, prompt)
