"""Streamed text and stop sequences, against a plain string reference."""

from __future__ import annotations

import pytest

from layerdecode.testing import tiny_tokenizer
from layerdecode.text import OutputStream, TextStream

WORDS = ["<unk>", "<s>", "</s>", "<user>", "<assistant>", "a", "b", "c", "d", "ab", "##c"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(words=WORDS)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, tokens, stop):
    text = TextStream(tokenizer, stop)
    pieces = []
    for token in tokens:
        pieces.append(text.add(token))
        if text.matched is not None:
            break
    pieces.append(text.finish())
    return pieces, text.matched


def reference(full: str, stop: list[str]) -> tuple[str, str | None]:
    found = [(full.find(s), s) for s in stop if s in full]
    if not found:
        return full, None
    index, matched = min(found)
    return full[:index], matched


@pytest.mark.parametrize(
    "stop",
    [[], ["c"], ["b c"], ["c d", "b"], ["zz"], ["d a", "a b"], ["b c d a b c d"]],
)
def test_stream_matches_reference(tokenizer, stop):
    tokens = ids(tokenizer, "a b c d a b c d")
    full = tokenizer.decode(tokens)
    pieces, matched = stream(tokenizer, tokens, stop)
    assert ("".join(pieces), matched) == reference(full, stop)


def test_a_possible_stop_is_held_back(tokenizer):
    text = TextStream(tokenizer, ["b c d"])
    assert text.add(ids(tokenizer, "a")[0]) == "a"
    assert text.add(ids(tokenizer, "b")[0]) == " "  # "b" may start the stop sequence
    assert text.add(ids(tokenizer, "c")[0]) == ""
    assert text.add(ids(tokenizer, "a")[0]) == "b c a"  # it did not
    assert text.matched is None


def test_output_stream_ends(tokenizer):
    eos = tokenizer.eos_token_id
    a, b = ids(tokenizer, "a b")
    out = OutputStream(tokenizer, max_tokens=3)
    assert out.feed(a) == ("a", "", "answer", None)
    assert out.feed(eos) == ("", "", "answer", "stop")
    assert out.matched_stop is None
    out = OutputStream(tokenizer, max_tokens=2)
    assert out.feed(a) == ("a", "", "answer", None)
    assert out.feed(b) == (" b", "", "answer", "length")
    out = OutputStream(tokenizer, max_tokens=-1, stop=["b"])
    assert out.feed(a) == ("a", "", "answer", None)
    assert out.feed(b) == (" ", "", "answer", "stop")
    assert out.matched_stop == "b"
