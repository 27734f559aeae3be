"""The engine's continuous batching: rows that join mid-flight, leave, or use other strategies
and temperatures in the same steps still equal their single runs."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from layerdecode import GenerationOptions, resolve_strategy
from layerdecode.engine import Engine, Plan
from layerdecode.generation import stream_resolved
from layerdecode.testing import tiny_model, tiny_tokenizer

STRATEGIES = [
    ("final", {}),
    ("confident", {"window": 4}),
    ("dola", {"layers": "high"}),
    ("sled", {}),
    ("fixed", {"layer": 3}),
]


def prompts_of_lengths(*lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(n)] for n in lengths]


def plan(name, params, max_tokens, **options):
    return Plan(
        resolve_strategy(name, params), GenerationOptions.build(max_tokens=max_tokens, **options)
    )


def single_run(model, tokenizer, prompt, name, params, max_tokens, **options):
    options = GenerationOptions.build(max_tokens=max_tokens, **options)
    ids = mx.array(prompt, dtype=mx.uint32)
    resolved = resolve_strategy(name, params)
    return [r.token for r in stream_resolved(model, tokenizer, ids, resolved, options)]


def run_live(engine, prompts, plans, join_at, steps=60, cancel_at=None):
    out = {i: [] for i in range(len(prompts))}
    for n in range(steps):
        for i in join_at.get(n, []):
            engine.add(prompts[i], plans[i], key=i)
        if cancel_at and n in cancel_at:
            engine.cancel(cancel_at[n])
        for event in engine.step():
            out[event.row].append(event.token)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name, params", STRATEGIES[:3])
def test_rows_joining_mid_flight_equal_single_runs(arch, name, params):
    model, tokenizer = tiny_model(arch), TokenizerWrapper(tiny_tokenizer())
    prompts = prompts_of_lengths(5, 1, 9, 3, 14, 7)
    expected = [single_run(model, tokenizer, p, name, params, 10) for p in prompts]
    engine = Engine(model, tokenizer)
    plans = [plan(name, params, 10)] * len(prompts)
    got = run_live(engine, prompts, plans, {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]})
    assert [got[i] for i in range(len(prompts))] == expected
    assert len(engine) == 0 and engine.step() == []


def test_rows_of_every_strategy_and_temperature_share_the_steps(monkeypatch):
    # One forward pass per step for rows of five strategies, greedy or sampled (seeded
    # rows draw from their own keys): every row equals its single run.
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    prompts = prompts_of_lengths(5, 8, 3, 11, 6, 9, 4, 7, 10, 2)
    settings = [(name, params, {}) for name, params in STRATEGIES]
    settings += [
        (name, params, {"temp": 0.8, "seed": 3 + i}) for i, (name, params) in enumerate(STRATEGIES)
    ]
    plans = [plan(name, params, 8, **opts) for name, params, opts in settings]
    expected = [
        single_run(model, tokenizer, p, name, params, 8, **opts)
        for p, (name, params, opts) in zip(prompts, settings, strict=True)
    ]
    engine = Engine(model, tokenizer)
    calls = []
    real = type(model).__call__

    def counted(self, inputs, *args, **kwargs):
        calls.append(inputs.shape)
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counted)
    got = {i: [] for i in range(len(prompts))}
    stepped = 0
    for n in range(40):
        for i in {0: range(6), 2: range(6, 10)}.get(n, ()):
            engine.add(prompts[i], plans[i], key=i)
        events = engine.step()
        stepped += bool(events)
        for event in events:
            got[event.row].append(event.token)
    assert [got[i] for i in range(len(prompts))] == expected
    assert len(engine.groups) == len(STRATEGIES)
    # One forward pass per step for all rows, whatever their strategies and sampling: as
    # many one-token passes as steps that gave tokens, the widest over all ten rows.
    decoding = [shape for shape in calls if shape[1] == 1]
    assert len(decoding) == stepped and max(shape[0] for shape in decoding) == len(prompts)


def test_a_cancelled_row_leaves_and_the_others_go_on():
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    prompts = prompts_of_lengths(4, 6, 8, seed=1)
    expected = [single_run(model, tokenizer, p, "final", {}, 12) for p in prompts]
    engine = Engine(model, tokenizer)
    plans = [plan("final", {}, 12)] * 3
    got = run_live(engine, prompts, plans, {0: [0, 1, 2]}, cancel_at={3: 1})
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == expected[1][: len(got[1])] and len(got[1]) <= 4


def test_logprobs_are_those_of_the_decoded_distribution():
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    engine = Engine(model, tokenizer)
    asked = Plan(resolve_strategy("final"), GenerationOptions(max_tokens=3), logprobs=3)
    engine.add([5, 6, 7], asked, key="a")
    events = [e for _ in range(5) for e in engine.step()]
    assert len(events) == 3
    for e in events:
        ids = [i for i, _ in e.top_logprobs]
        values = [v for _, v in e.top_logprobs]
        assert ids[0] == e.token and values == sorted(values, reverse=True)
        assert e.logprob == pytest.approx(values[0]) and e.logprob <= 0


def test_strategies_no_row_uses_are_let_go():
    model, tokenizer = tiny_model("llama"), TokenizerWrapper(tiny_tokenizer())
    engine = Engine(model, tokenizer)
    engine.add([5, 6], plan("confident", {"window": 4}, 2), key="a")
    engine.add([7, 8], plan("dola", {"layers": "high"}, 2), key="b")
    list(engine.run())
    engine.add([5, 6], plan("final", {}, 2), key="c")
    assert [g.strategy.name for g in engine.groups.values()] == ["final"]
    assert [e.row for events in engine.run() for e in events] == ["c", "c"]
