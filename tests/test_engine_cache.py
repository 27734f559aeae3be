"""Reusing a prompt's caches: a cached prefix decodes as a cold run does."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from layerdecode.config import resolve_strategy
from layerdecode.engine import Engine, Plan
from layerdecode.errors import ConfigError
from layerdecode.options import GenerationOptions
from layerdecode.testing import tiny_model
from tests.test_batch import prompts_of_lengths


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def plan(name="final", n=8, **params):
    return Plan(resolve_strategy(name, params or None), GenerationOptions(max_tokens=n))


def collect(engine):
    rows = {}
    for events in engine.run():
        for e in events:
            rows.setdefault(e.row, []).append((e.token, e.layer, e.cached_tokens))
    return rows


@pytest.mark.parametrize(
    "name, params", [("final", {}), ("confident", {"window": 4}), ("dola", {"layers": [0, 2]})]
)
@pytest.mark.parametrize("company", [0, 2])
def test_a_cached_prefix_gives_the_tokens_and_layers_of_a_cold_run(model, name, params, company):
    first, more, *others = prompts_of_lengths(9, 5, *[6] * company, seed=21)
    lru = LRUPromptCache(max_size=4)
    kept = []

    engine = Engine(model)
    engine.add(first, plan(name, 6, **params), key="turn1",
               on_cache=lambda tokens, cache: kept.append((tokens, cache)))  # fmt: skip
    turn1 = collect(engine)["turn1"]
    ((tokens, cache),) = kept
    # The caches hold the prompt and the generated tokens fed back (all but the last).
    assert tokens == first + [t for t, *_ in turn1][:-1]
    assert cache[0].offset == len(tokens)
    lru.insert_cache("m", tokens, cache)

    second = [*tokens, *more]
    cold = Engine(model)
    cold.add(second, plan(name, 8, **params), key="turn2")
    for i, other in enumerate(others):
        cold.add(other, plan(name, 8, **params), key=i)
    expected = collect(cold)

    warm_cache, rest = lru.fetch_nearest_cache("m", second)
    assert rest == more
    warm = Engine(model)
    for i, other in enumerate(others):  # other rows in the batch alongside
        warm.add(other, plan(name, 8, **params), key=i)
    warm.add(second, plan(name, 8, **params), key="turn2", prompt_cache=warm_cache,
             cached=len(second) - len(rest))  # fmt: skip
    got = collect(warm)
    assert [(t, layer) for t, layer, _ in got["turn2"]] == [
        (t, layer) for t, layer, _ in expected["turn2"]
    ]
    assert {c for *_, c in got["turn2"]} == {len(tokens)}
    for i in range(company):
        assert got[i] == expected[i]


def test_an_exact_hit_decodes_its_last_token_again(model):
    (prompt,) = prompts_of_lengths(12, seed=3)
    kept = []
    engine = Engine(model)
    engine.add(prompt, plan(n=4), on_cache=lambda t, c: kept.append((t, c)))
    collect(engine)
    tokens, cache = kept[0]
    trim_prompt_cache(cache, 1)  # the last token is decoded: the cache holds the rest
    engine.add(tokens, plan(n=4), key="again", prompt_cache=cache, cached=len(tokens) - 1)
    cold = Engine(model)
    cold.add(tokens, plan(n=4), key="again")
    assert [t for t, *_ in collect(engine)["again"]] == [t for t, *_ in collect(cold)["again"]]


def test_cancelled_rows_give_no_cache_and_bad_counts_are_refused(model):
    kept = []
    engine = Engine(model)
    engine.add([1, 2, 3], plan(n=50), key="a", on_cache=lambda t, c: kept.append(t))
    engine.step()
    engine.cancel("a")
    collect(engine)
    assert kept == []
    with pytest.raises(ConfigError, match="cached=3"):
        engine.add([1, 2, 3], plan(), prompt_cache=[], cached=3)
    with pytest.raises(ConfigError, match="cached=1"):
        engine.add([1, 2, 3], plan(), cached=1)  # no cache given


def test_quantised_caches_run_rows_one_at_a_time_as_mlx_lm_does():
    from mlx_lm.generate import generate_step

    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    prompts = prompts_of_lengths(9, 30, seed=5)
    engine = Engine(model, kv_bits=8, kv_group_size=64, quantized_kv_start=4)
    for i, p in enumerate(prompts):
        engine.add(p, plan(n=6), key=i)
    order = [e.row for step in engine.run() for e in step]
    assert order == [0] * 6 + [1] * 6  # the second row starts when the first ends
    for i, p in enumerate(prompts):
        engine.add(p, plan(n=6), key=i)
    got = {}
    for step in engine.run():
        for e in step:
            got.setdefault(e.row, []).append(e.token)
    for i, p in enumerate(prompts):
        expected = [
            int(t)
            for t, _ in generate_step(
                mx.array(p), model, max_tokens=6, kv_bits=8, kv_group_size=64,
                quantized_kv_start=4,
            )
        ]  # fmt: skip
        assert got[i] == expected
    # The caches are quantised (they held more than quantized_kv_start tokens).
    kept = []
    engine.add(prompts[1], plan(n=3), on_cache=lambda t, c: kept.append(c))
    list(engine.run())
    assert type(kept[0][0]).__name__ == "QuantizedKVCache"
    # Samples of one prompt cannot share batched quantised caches: one at a time too.
    engine.add_samples(prompts[0], [plan(n=3), plan(n=3)], ["s0", "s1"])
    order = [e.row for step in engine.run() for e in step]
    assert order == ["s0"] * 3 + ["s1"] * 3


def test_samples_of_one_prompt_share_one_prefill(model):
    (prompt,) = prompts_of_lengths(40, seed=9)
    chunks = []
    engine = Engine(model, prefill_step_size=16)
    seeded = [
        Plan(resolve_strategy("confident", {"window": 4}),
             GenerationOptions(max_tokens=6, temp=1.0, seed=s))
        for s in (1, 2, 3)
    ]  # fmt: skip
    engine.add_samples(prompt, seeded, ["a", "b", "c"], progress=lambda d, t: chunks.append(d))
    assert len(engine) == 3
    rows = collect(engine)
    assert chunks == [0, 16, 32, 39, 40]  # one prefill, not three
    for key, p in zip("abc", seeded, strict=True):  # each as if it ran alone
        alone = Engine(model)
        alone.add(prompt, p, key=key)
        assert [t for t, *_ in rows[key]] == [t for t, *_ in collect(alone)[key]]
    engine.add_samples(prompt, seeded, ["a", "b", "c"])
    engine.cancel("b")
    assert len(engine) == 2 and set(collect(engine)) == {"a", "c"}
