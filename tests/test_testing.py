"""layerdecode.testing: the helpers plugin authors and our own tests rely on."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import layerdecode
from layerdecode.registry import get_strategy, list_strategies, register_strategy
from layerdecode.strategy import Decision, Strategy
from layerdecode.testing import (
    TINY_ARCHITECTURES,
    TINY_SPECIAL_WORDS,
    check_final_matches_mlx_lm,
    fresh_registry,
    save_tiny_model,
    select_on,
    tiny_model,
    tiny_tokenizer,
    view_over,
)
from layerdecode.view import EMBEDDINGS, Exit


def random_logits(seed: int) -> np.ndarray:
    """Logits (layers=7, batch=5, vocab=30) with a temperature per layer and row."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(7, 5, 30)) * rng.uniform(0.3, 3.0, size=(7, 5, 1))
    return logits.astype(np.float32)


def np_entropy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return -(np.exp(lp) * lp).sum(-1)


# -- view_over and select_on -------------------------------------------------------------


@pytest.mark.parametrize("as_mx", [False, True])
def test_view_over_gives_back_each_layers_logits(as_mx):
    logits = random_logits(0)
    embeddings = random_logits(1)[0]
    exits = [Exit(1), Exit(4), Exit(6), Exit(2, norm=False), Exit(EMBEDDINGS, norm=False)]
    given = mx.array(logits) if as_mx else logits
    view = view_over(given, embeddings=embeddings, exits=exits, tied=False)
    assert (view.num_layers, view.batch_size, view.adapter.tied_embeddings) == (7, 5, False)
    for layer in (1, 4, 6):
        np.testing.assert_array_equal(np.array(view.logits(layer)), logits[layer])
        np.testing.assert_allclose(
            np.array(view.entropy(layer)), np_entropy(logits[layer]), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(np.array(view.logits(2, norm=False)), logits[2])
    np.testing.assert_array_equal(np.array(view.logits(EMBEDDINGS, norm=False)), embeddings)
    np.testing.assert_array_equal(np.array(view.final_logits), logits[-1])
    np.testing.assert_array_equal(np.array(view.stack_logits([1, 4])), logits[[1, 4]])
    with pytest.raises(KeyError, match="was not declared"):
        view.logits(3)


def test_view_over_norm_applies_to_normed_exits_only():
    logits = random_logits(2)
    view = view_over(logits, exits=[Exit(3), Exit(3, norm=False)], norm=lambda h: h * 2.0)
    np.testing.assert_allclose(np.array(view.logits(3)), logits[3] * 2.0)
    np.testing.assert_array_equal(np.array(view.logits(3, norm=False)), logits[3])


@pytest.mark.parametrize("layer", [0, 3, -1])
def test_select_on_runs_a_strategy_like_numpy(layer):
    logits = random_logits(3)
    decision = select_on(get_strategy("fixed", layer=layer), logits)
    expected = layer % 7
    assert isinstance(decision, Decision)
    assert np.array(decision.layers).tolist() == [expected] * 5
    np.testing.assert_array_equal(np.array(decision.logits), logits[expected])
    np.testing.assert_allclose(
        np.array(decision.entropy), np_entropy(logits[expected]), rtol=1e-4, atol=1e-5
    )


def test_select_on_prepares_with_the_facts_and_passes_embeddings():
    seen = {}

    class Spy(Strategy):
        name = "spy"

        def exits(self):
            return [Exit(EMBEDDINGS, norm=False)]

        def select(self, view):
            seen["facts"] = self.model
            logits = view.logits(EMBEDDINGS, norm=False)
            return Decision(
                logits,
                mx.full((view.batch_size,), -1),
                view.entropy(EMBEDDINGS, norm=False),
                extras={"twice": mx.full((view.batch_size,), 2)},
            )

    logits, embeddings = random_logits(4), random_logits(5)[0]
    decision = select_on(Spy(), logits, embeddings=embeddings, tied=False)
    facts = seen["facts"]
    assert (facts.num_layers, facts.tied_embeddings, facts.model_type) == (7, False, "test")
    np.testing.assert_array_equal(np.array(decision.logits), embeddings)
    assert np.array(decision.extras["twice"]).tolist() == [2] * 5


# -- tiny models -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gemma3_text"])
def test_tiny_model_is_small_deterministic_and_of_its_architecture(arch):
    model = tiny_model(arch)
    ids = mx.array([[3, 17, 42, 8]])
    assert model.model_type == arch
    assert len(model.model.layers) == 6
    assert model(ids).shape == (1, 4, 211)
    assert mx.array_equal(model(ids), tiny_model(arch)(ids)).item()
    assert not mx.array_equal(model(ids), tiny_model(arch, seed=1)(ids)).item()
    assert len(tiny_model(arch, num_layers=3).model.layers) == 3
    module, _ = TINY_ARCHITECTURES[arch]
    assert type(model).__module__ == f"mlx_lm.models.{module}"


def test_tiny_model_weight_scale_and_overrides():
    plain = tiny_model("llama", weight_scale=1.0, vocab_size=50, intermediate_size=32)
    scaled = tiny_model("llama", vocab_size=50, intermediate_size=32)
    assert plain.args.vocab_size == 50 and plain.args.intermediate_size == 32
    w1 = plain.model.layers[0].mlp.gate_proj.weight
    w2 = scaled.model.layers[0].mlp.gate_proj.weight
    assert mx.allclose(w1 * 2.0, w2).item()
    with pytest.raises(KeyError, match="Unknown tiny architecture 'no_such_model'"):
        tiny_model("no_such_model")


def test_tiny_tokenizer_words_and_chat_template():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer.get_vocab()) == 211
    assert tokenizer.encode("w7 w8 w9") == [7, 8, 9]
    assert tokenizer.eos_token_ids == {TINY_SPECIAL_WORDS.index("</s>")}
    messages = [{"role": "user", "content": "w7"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == [3, 7, 4]  # <user> w7 <assistant>
    words = ["<unk>", "<s>", "</s>", "<user>", "<assistant>", "paris", "paris", "is"]
    custom = tiny_tokenizer(words=words)
    assert custom.encode("is paris") == [6, 5]  # repeats dropped
    with pytest.raises(ValueError, match="</s>"):
        tiny_tokenizer(words=["<unk>", "<s>", "hello"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_save_tiny_model_loads_and_generates(tmp_path, arch):
    path = save_tiny_model(tmp_path / arch, arch, num_layers=4)
    model, tokenizer = layerdecode.load(path)
    assert len(model.model.layers) == 4
    assert tokenizer.encode("w7 w8") == [7, 8]
    result = layerdecode.generate(model, tokenizer, "w7 w8 w9", max_tokens=5)
    assert result.num_layers == 4 and len(result.tokens) > 0
    # The saved model is the tiny model: same tokens as the one built in memory.
    same = layerdecode.generate(
        tiny_model(arch, num_layers=4), tiny_tokenizer(), "w7 w8 w9", max_tokens=5
    )
    assert result.tokens == same.tokens


def test_tiny_model_dir_fixture_loads_with_mlx_lm(tiny_model_dir):
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    assert len(model.model.layers) == 6
    assert tokenizer.chat_template


def test_save_tiny_model_with_words(tmp_path):
    words = ["<unk>", "<s>", "</s>", "<system>", "<user>", "<assistant>", "hello", "world"]
    model, tokenizer = layerdecode.load(save_tiny_model(tmp_path / "w", words=words))
    assert model.args.vocab_size == len(words)
    messages = [{"role": "system", "content": "world"}, {"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == [3, 7, 4, 6, 5]


# -- check_final_matches_mlx_lm ------------------------------------------------------------


def test_check_final_matches_mlx_lm_passes(tiny_llama):
    model, tokenizer = tiny_llama
    tokens = check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", max_tokens=10)
    assert len(tokens) == 10
    assert len(check_final_matches_mlx_lm(model, tokenizer, [5, 17, 42], max_tokens=4)) == 4
    # A strategy whose params leave only the final layer passes too.
    p0 = get_strategy("confident", p=0.0)
    assert check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", max_tokens=10, strategy=p0) == (
        tokens
    )


class ForcedToken(Strategy):
    """The final layer, except that one token always wins from step ``start`` on."""

    name = "forced"

    def __init__(self, token: int, start: int = 0) -> None:
        super().__init__()
        self.token, self.start = token, start

    def prepare(self, model):
        super().prepare(model)
        self.step = 0

    def select(self, view):
        final = view.final_logits
        # A Python counter, not an array branch: steps are known when select is called.
        bonus = 1e4 if self.step >= self.start else 0.0
        self.step += 1
        logits = final + bonus * (mx.arange(final.shape[-1]) == self.token)
        layers = mx.full((view.batch_size,), view.final_layer)
        return Decision(logits, layers, view.entropy(view.final_layer))


def test_check_final_matches_mlx_lm_fails_on_a_different_token(tiny_llama):
    model, tokenizer = tiny_llama
    expected = check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", max_tokens=8)
    forced = next(t for t in range(5, 211) if t not in expected)
    with pytest.raises(AssertionError) as err:
        check_final_matches_mlx_lm(
            model, tokenizer, "w7 w8 w9", max_tokens=8, strategy=ForcedToken(forced, start=3)
        )
    message = str(err.value)
    assert "differ at generated token 3" in message
    assert f"layerdecode gave {forced}, mlx-lm {expected[3]}" in message
    assert f"Both gave {expected[:3]} before it" in message


def test_check_final_matches_mlx_lm_fails_on_an_early_end(tiny_llama):
    model, tokenizer = tiny_llama
    expected = check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", max_tokens=8)
    eos = TINY_SPECIAL_WORDS.index("</s>")
    with pytest.raises(
        AssertionError,
        match=r"differ at generated token 2: layerdecode gave "
        r"nothing \(end of sequence\), mlx-lm " + str(expected[2]),
    ):
        check_final_matches_mlx_lm(
            model, tokenizer, "w7 w8 w9", max_tokens=8, strategy=ForcedToken(eos, start=2)
        )


class FinalReportedAsLayerTwo(Strategy):
    """The model's own logits, reported as decoded from layer 2."""

    name = "mislabelled"

    def select(self, view):
        layers = mx.full((view.batch_size,), 2)
        return Decision(view.final_logits, layers, view.entropy(view.final_layer))


def test_check_final_matches_mlx_lm_fails_on_another_layer(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(AssertionError, match="token 0 came from layer 2, not the final layer 5"):
        check_final_matches_mlx_lm(model, tokenizer, "w7 w8 w9", strategy=FinalReportedAsLayerTwo())


# -- fresh_registry ------------------------------------------------------------------------


def test_fresh_registry_forgets_what_was_registered_inside():
    class Inside(Strategy):
        pass

    with fresh_registry():
        register_strategy("only-inside")(Inside)
        assert "only-inside" in list_strategies()
        assert isinstance(get_strategy("only-inside"), Inside)
    assert "only-inside" not in list_strategies()
    assert {"final", "fixed", "dola", "confident"} <= set(list_strategies())


def test_fresh_registry_cleans_up_after_an_error():
    class Broken(Strategy):
        pass

    with pytest.raises(RuntimeError), fresh_registry():
        register_strategy("broken-inside")(Broken)
        raise RuntimeError("boom")
    assert "broken-inside" not in list_strategies()


@pytest.mark.usefixtures("fresh_registry")
def test_fresh_registry_fixture():
    class Mine(Strategy):
        pass

    register_strategy("mine-from-fixture")(Mine)
    assert "mine-from-fixture" in list_strategies()
