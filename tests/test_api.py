"""The public entry points: options once, strategy resolved once, stop sequences, taps."""

from __future__ import annotations

import mlx.core as mx
import pytest

from layerdecode import GenerationOptions, batch_generate, generate, stream_generate
from layerdecode.engine import remove_taps
from layerdecode.errors import ConfigError
from layerdecode.taps import LayerTaps, is_tapped
from layerdecode.testing import tiny_model, tiny_tokenizer

PROMPT = "w7 w8 w9 w10 w11"


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama"), tiny_tokenizer()


def middle_word(text: str) -> str:
    words = text.split()
    assert len(words) >= 6, text
    return words[len(words) // 2]


@pytest.mark.parametrize("strategy", ["final", "confident"])
def test_stop_sequence_ends_text_before_it(pair, strategy):
    model, tokenizer = pair
    full = generate(model, tokenizer, PROMPT, strategy=strategy, max_tokens=24)
    stop = middle_word(full.text)
    cut = generate(model, tokenizer, PROMPT, strategy=strategy, max_tokens=24, stop=[stop, "zz"])
    assert cut.finish_reason == "stop" and cut.stop_sequence == stop
    assert cut.text == full.text[: full.text.index(stop)]
    # Tokens up to and including the one that spelled the stop sequence.
    assert cut.tokens == full.tokens[: len(cut.tokens)]
    assert tokenizer.decode(cut.tokens).endswith(stop)
    # Streamed pieces never contain the stop sequence.
    responses = stream_generate(
        model, tokenizer, PROMPT, strategy=strategy, max_tokens=24, stop=stop
    )
    pieces = [r.text for r in responses]
    assert "".join(pieces) == cut.text
    assert all(stop not in piece for piece in pieces)


def test_batch_rows_with_stops_equal_single_runs(pair):
    model, tokenizer = pair
    prompts = [PROMPT, "w30 w31", "w100 w101 w102 w103 w104 w105 w106"]
    options = GenerationOptions(max_tokens=20)
    full, _ = batch_generate(model, tokenizer, prompts, options=options, batch_size=1)
    stop = middle_word(full[0].text)
    options = GenerationOptions(max_tokens=20, stop=[stop])
    single, _ = batch_generate(model, tokenizer, prompts, options=options, batch_size=1)
    batched, _ = batch_generate(model, tokenizer, prompts, options=options, batch_size=3)
    assert single[0].finish_reason == "stop" and single[0].stop_sequence == stop
    for one, many in zip(single, batched, strict=True):
        assert (many.text, many.tokens, many.layers, many.finish_reason) == (
            one.text,
            one.tokens,
            one.layers,
            one.finish_reason,
        )


def test_options_object_and_keywords_agree(pair):
    model, tokenizer = pair
    a = generate(model, tokenizer, PROMPT, options=GenerationOptions(temp=0.9, seed=5))
    b = generate(model, tokenizer, PROMPT, options={"temp": 0.9}, seed=5, max_tokens=None)
    assert a.tokens == b.tokens
    with pytest.raises(ConfigError, match="Unknown generation options: tmp"):
        generate(model, tokenizer, PROMPT, tmp=0.5)


def test_preset_defaults_under_user_options(pair, monkeypatch):
    from layerdecode.engine import Engine

    model, tokenizer = pair
    seen = []
    real = Engine.add

    def spy(self, prompt, plan, **kwargs):
        seen.append(len(plan.options.logits_processors()))
        return real(self, prompt, plan, **kwargs)

    monkeypatch.setattr(Engine, "add", spy)
    generate(model, tokenizer, PROMPT, strategy="dola", max_tokens=2)  # preset: penalty 1.2
    generate(model, tokenizer, PROMPT, strategy="dola", max_tokens=2, repetition_penalty=1.0)
    assert seen == [1, 0]


def test_strategy_resolved_and_adapter_built_once(pair, monkeypatch):
    model, tokenizer = pair
    import layerdecode.config as config
    import layerdecode.engine as engine

    counts = {"preset": 0, "adapter": 0}
    find, adapter = config.find_preset, engine.get_adapter

    def count_find(spec):
        counts["preset"] += 1
        return find(spec)

    def count_adapter(m):
        counts["adapter"] += 1
        return adapter(m)

    monkeypatch.setattr(config, "find_preset", count_find)
    monkeypatch.setattr(engine, "get_adapter", count_adapter)
    generate(model, tokenizer, PROMPT, strategy="confident", max_tokens=3)
    assert counts == {"preset": 1, "adapter": 1}
    batch_generate(model, tokenizer, [PROMPT, "w3 w4"], strategy="confident", max_tokens=3)
    assert counts == {"preset": 2, "adapter": 2}


def test_taps_come_off(pair):
    model, tokenizer = pair
    layers = model.model.layers
    original = [getattr(type(layer), "_layerdecode_original", type(layer)) for layer in layers]
    ids = mx.array(tokenizer.encode(PROMPT), dtype=mx.uint32)[None]
    expected = model(ids)
    first = generate(model, tokenizer, PROMPT, strategy="confident", max_tokens=6)
    assert all(is_tapped(layer) for layer in layers)
    assert all(isinstance(layer, cls) for layer, cls in zip(layers, original, strict=True))
    remove_taps(model)
    assert [type(layer) for layer in layers] == original
    assert not any(is_tapped(layer) for layer in layers)
    assert mx.array_equal(model(ids), expected).item()
    # Decoding taps the model again, with the same outcome.
    again = generate(model, tokenizer, PROMPT, strategy="confident", max_tokens=6)
    assert (again.tokens, again.layers) == (first.tokens, first.layers)
    remove_taps(model)
    remove_taps(model)  # idempotent


def test_taps_context_removes_only_its_own():
    model = tiny_model("llama", num_layers=3)
    layers = list(model.model.layers)
    plain = [type(layer) for layer in layers]
    with LayerTaps(layers[:1]):
        with LayerTaps(layers) as inner:
            assert all(is_tapped(layer) for layer in layers)
            assert inner.num_layers == 3
        assert is_tapped(layers[0]) and not is_tapped(layers[1])
    assert [type(layer) for layer in layers] == plain
