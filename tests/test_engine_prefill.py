"""Chunked prefill in the engine: long prompts do not stall the running rows."""

from __future__ import annotations

import pytest

from layerdecode.batch import batch_generate_step
from layerdecode.config import resolve_strategy
from layerdecode.engine import Engine, Plan
from layerdecode.options import GenerationOptions
from tests.test_batch import prompts_of_lengths, single_runs

CHUNK = 16


def plan(name="final", n=8, **params):
    return Plan(resolve_strategy(name, params or None), GenerationOptions(max_tokens=n))


def tokens_of(events, key):
    return [e.token for e in events if e.row == key]


@pytest.fixture(scope="module")
def model():
    from layerdecode.testing import tiny_model

    return tiny_model("llama")


@pytest.mark.parametrize("name, params", [("final", {}), ("confident", {"window": 4})])
def test_running_rows_keep_decoding_while_a_long_prompt_is_prefilled(model, name, params):
    short, long = prompts_of_lengths(5, 5 * CHUNK + 3, seed=3)
    engine = Engine(model, prefill_step_size=CHUNK)
    engine.add(short, plan(name, 30, **params), key="short")
    events = engine.step()  # the short row alone: its first token
    assert tokens_of(events, "short")
    chunks = []
    engine.add(long, plan(name, 8, **params), key="long", progress=lambda d, t: chunks.append(d))
    steps_before_long_token = 0
    while not any(e.row == "long" for e in events):
        events = engine.step()
        # Every step while the long prompt is prefilled still gives the short row a token.
        assert tokens_of(events, "short"), "the running row stalled behind the prefill"
        steps_before_long_token += 1
    # Five full chunks and the rest, one per step (never the prompt's last token).
    assert chunks[1:] == [16, 32, 48, 64, 80, 82, 83]
    assert steps_before_long_token == 7
    collected = {"short": [], "long": []}
    for step in [events, *engine.run()]:
        for e in step:
            collected[e.row].append(e.token)
    (alone_long,) = [[t for t, *_ in r] for r in single_runs(model, [long], name, params, 8)]
    assert collected["long"] == alone_long


def test_tokens_are_those_of_single_runs(model):
    prompts = prompts_of_lengths(3, 70, 9, 40, 2, seed=5)
    engine = Engine(model, prefill_step_size=CHUNK)
    for i, p in enumerate(prompts):
        engine.add(p, plan(n=12), key=i)
    rows = {i: [] for i in range(len(prompts))}
    for events in engine.run():
        for e in events:
            rows[e.row].append(e.token)
    expected = single_runs(model, prompts, "final", {}, 12, prefill_step_size=CHUNK)
    assert [rows[i] for i in range(len(prompts))] == [[t for t, *_ in r] for r in expected]


def test_a_row_cancelled_while_prefilled_frees_its_work_at_once(model):
    short, long = prompts_of_lengths(4, 10 * CHUNK, seed=7)
    engine = Engine(model, prefill_step_size=CHUNK)
    engine.add(short, plan(n=40), key="short")
    engine.step()
    engine.add(long, plan(n=8), key="long")
    engine.step()
    assert engine.prefilling is not None and engine.prefilling.key == "long"
    assert len(engine) == 2
    engine.cancel("long")
    assert engine.prefilling is None and len(engine) == 1
    # The next row starts at once: it joins at the next step.
    engine.add(short, plan(n=3), key="next")
    engine.step()
    events = engine.step()
    assert tokens_of(events, "next") and tokens_of(events, "short")
    assert all(e.row != "long" for step in engine.run() for e in step)


def test_short_prompts_pass_long_ones_which_keep_their_order(model):
    first, second, third = prompts_of_lengths(3 * CHUNK, 3 * CHUNK, 4, seed=11)
    engine = Engine(model, prefill_step_size=CHUNK)
    for key, p in (("a", first), ("b", second), ("c", third)):
        engine.add(p, plan(n=4), key=key)
    seen: list[str] = []
    for events in engine.run():
        for e in events:
            if e.row not in seen:
                seen.append(e.row)
    # "c" does not wait for the long prefills queued before it; "b" waits for "a".
    assert seen == ["c", "a", "b"]


def test_a_short_request_behind_a_long_prefill_starts_at_once(model):
    short, long, late = prompts_of_lengths(4, 10 * CHUNK, 5, seed=12)
    engine = Engine(model, prefill_step_size=CHUNK)
    engine.add(short, plan(n=40), key="running")
    engine.step()
    engine.add(long, plan(n=4), key="long")
    engine.step()  # its first chunk
    engine.add(late, plan(n=4), key="late")
    filled = engine.prefilling.filled
    engine.step()  # "late" is prefilled, and the long prompt waits for this step...
    assert engine.prefilling.filled == filled
    events = engine.step()  # ...so it has its first token now, long before the long prompt
    assert {e.row for e in events} == {"running", "late"}
    assert engine.prefilling is not None and engine.prefilling.key == "long"
    # Short prompts coming at every step do not starve the long one: it goes on every
    # other step at least.
    moved = 0
    for i in range(6):
        before = engine.prefilling.filled
        engine.add(late, plan(n=2), key=("more", i))
        engine.step()
        moved += engine.prefilling.filled > before
    assert moved == 3


def test_batch_generate_does_not_stall_behind_one_long_item(model):
    prompts = prompts_of_lengths(4, 4, 12 * CHUNK, 4, seed=2)
    steps = list(
        batch_generate_step(
            prompts, model, resolve_strategy("final").strategy, max_tokens=6,
            prefill_step_size=CHUNK,
        )
    )  # fmt: skip
    first_step_of = {}
    for i, step in enumerate(steps):
        for r in step:
            first_step_of.setdefault(r.row, i)
    # The short items answer in the first step, not after the long one's 12 chunks.
    assert first_step_of[0] == first_step_of[1] == 0
    assert first_step_of[2] >= 6


def test_a_prompt_cache_row_may_join_a_batch(model):
    from mlx_lm.models.cache import make_prompt_cache

    a, b = prompts_of_lengths(6, 9, seed=4)
    engine = Engine(model)
    engine.add(a, plan(n=10), key="a")
    first = engine.step()
    cache = make_prompt_cache(model)
    engine.add(b, plan(n=5), key="b", prompt_cache=cache)
    rows = {"a": [], "b": []}
    for events in [first, *engine.run()]:
        for e in events:
            rows[e.row].append(e.token)
    assert cache[0].offset == len(b) - 1  # the prompt went into the given cache
    expected = single_runs(model, [a, b], "final", {}, 10)
    assert rows["a"] == [t for t, *_ in expected[0]]
    assert rows["b"] == [t for t, *_ in expected[1][:5]]
