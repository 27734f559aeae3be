"""Per-token statistics: the "changed" flag, head rows, candidate entropies."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.sample_utils import make_repetition_penalty

from layerdecode.config import resolve_strategy
from layerdecode.engine import Engine, Plan
from layerdecode.options import GenerationOptions
from layerdecode.testing import tiny_model
from layerdecode.view import EMBEDDINGS
from tests.test_batch import prompts_of_lengths

STRATEGIES = [
    ("final", {}),
    ("fixed", {"layer": 3}),
    ("confident", {"window": 5, "scan": "eager"}),
    ("confident", {"window": 5, "scan": "lazy"}),
    ("confident", {"window": 4, "method": "trough-m1", "scan": "lazy"}),
    ("dola", {"layers": [0, 2, 3]}),
    ("sled", {}),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def run(model, prompts, name, params, n=12, candidates=False, **options):
    engine = Engine(model)
    resolved = resolve_strategy(name, params or None)
    for i, prompt in enumerate(prompts):
        plan = Plan(resolved, GenerationOptions(max_tokens=n, **options), candidates=candidates)
        engine.add(prompt, plan, key=i)
    rows = {i: [] for i in range(len(prompts))}
    for events in engine.run():
        for e in events:
            rows[e.row].append(e)
    return engine, [rows[i] for i in range(len(prompts))]


def final_layer_tokens(model, prompt, generated, penalty=None):
    """Independently: the final layer's greedy token at each generated position, from one
    forward pass over the whole sequence without taps or caches (processors applied)."""
    sequence = mx.array([*prompt, *generated[:-1]])[None]
    logits = model(sequence)[0, len(prompt) - 1 :].astype(mx.float32)
    out = []
    for i in range(len(generated)):
        row = logits[i : i + 1]
        if penalty is not None:
            history = mx.array([*prompt, *generated[:i]])
            row = make_repetition_penalty(penalty, 20)(history, row)
        out.append(int(mx.argmax(row, axis=-1).item()))
    return out


@pytest.mark.parametrize("name, params", STRATEGIES)
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_changed_flag_against_the_final_layers_own_tokens(model, name, params, penalty):
    prompts = prompts_of_lengths(3, 11, 6, seed=8)
    options = {} if penalty is None else {"repetition_penalty": penalty}
    _, rows = run(model, prompts, name, params, **options)
    changed_any = 0
    for prompt, events in zip(prompts, rows, strict=True):
        tokens = [e.token for e in events]
        finals = final_layer_tokens(model, prompt, tokens, penalty)
        expected = [t != f for t, f in zip(tokens, finals, strict=True)]
        assert [e.changed for e in events] == expected
        changed_any += sum(expected)
    if name == "final":
        assert changed_any == 0
    elif name != "confident" or params.get("method") == "trough-m1":
        assert changed_any > 0  # the tiny model's layers disagree: the flag is exercised


@pytest.mark.parametrize("temp, seed", [(0.9, None), (0.9, 3)])
def test_the_same_draw_is_replayed_for_the_reference(model, temp, seed):
    # A window of one: the strategy decodes the final layer through its own head call, so
    # its logits are equal to the final layer's but computed apart; under sampling, only
    # replaying the same draw keeps every token unchanged.
    prompts = prompts_of_lengths(4, 9, 2, 7, seed=1)
    mx.random.seed(0)
    _, rows = run(model, prompts, "confident", {"window": 1, "scan": "eager"}, 20, temp=temp,
                  seed=seed)  # fmt: skip
    flags = [e.changed for events in rows for e in events]
    assert len(flags) == 80 and not any(flags)
    # While a lower layer's sampled tokens do change (the flag is not constant).
    _, rows = run(model, prompts, "fixed", {"layer": 1}, 20, temp=temp, seed=seed)
    assert any(e.changed for events in rows for e in events)


def test_a_callers_own_sampler_cannot_be_replayed(model):
    engine = Engine(model)
    plan = Plan(resolve_strategy("fixed", {"layer": 2}), GenerationOptions(max_tokens=4),
                sampler=lambda lp: mx.random.categorical(lp))  # fmt: skip
    engine.add([1, 2, 3], plan)
    events = [e for step in engine.run() for e in step]
    assert [e.changed for e in events] == [None] * 4
    engine.add([1, 2, 3], Plan(resolve_strategy("final"), GenerationOptions(max_tokens=4),
                               sampler=lambda lp: mx.random.categorical(lp)))  # fmt: skip
    assert all(e.changed is False for step in engine.run() for e in step)


def test_head_rows_per_strategy(model):
    prompts = prompts_of_lengths(5, 8, seed=2)
    expect = {"final": 1, "fixed": 1, "dola": 4}
    for name, params in STRATEGIES:
        engine, rows = run(model, prompts, name, params)
        heads = [e.head_rows for events in rows for e in events]
        if name in expect:
            assert set(heads) == {expect[name]}, name
        elif name == "confident" and params["scan"] == "eager":
            assert set(heads) == {params["window"]}
        elif name == "confident":
            # The lazy walk's cost is the strategy's own count of head products.
            (group,) = engine.groups.values()
            assert sum(heads) == group.strategy.stats.projections
            assert min(heads) >= 2 and max(heads) <= params["window"] + 1
        elif name == "sled":
            # The embeddings' output and each layer below the final through one head call,
            # and the model's own output.
            assert set(heads) == {model.args.num_hidden_layers + 1}


def test_head_rows_of_rows_sharing_a_step_are_their_own(model):
    prompts = prompts_of_lengths(5, 8, 3, seed=6)
    engine = Engine(model)
    plans = [
        Plan(resolve_strategy("confident", {"window": 5, "scan": "lazy"}),
             GenerationOptions(max_tokens=10)),
        Plan(resolve_strategy("final"), GenerationOptions(max_tokens=10)),
        Plan(resolve_strategy("confident", {"window": 3, "scan": "eager"}),
             GenerationOptions(max_tokens=10)),
    ]  # fmt: skip
    for i, (prompt, plan) in enumerate(zip(prompts, plans, strict=True)):
        engine.add(prompt, plan, key=i)
    events = [e for step in engine.run() for e in step]
    assert {e.head_rows for e in events if e.row == 1} == {1}
    assert {e.head_rows for e in events if e.row == 2} == {3}
    lazy = [e for e in events if e.row == 0]
    # Alone, the same row costs the same head rows.
    _, (alone,) = run(model, prompts[:1], "confident", {"window": 5, "scan": "lazy"}, 10)
    assert [e.head_rows for e in lazy] == [e.head_rows for e in alone]


def entropy(logits):
    lp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    return float(-(mx.exp(lp) * lp).sum().item())


def test_candidate_entropies(model):
    prompt = prompts_of_lengths(6, seed=4)[0]
    _, (eager,) = run(model, [prompt], "confident", {"window": 5, "scan": "eager"},
                      candidates=True)  # fmt: skip
    _, (lazy,) = run(model, [prompt], "confident", {"window": 5, "scan": "lazy"},
                     candidates=True)  # fmt: skip
    _, (plain,) = run(model, [prompt], "confident", {"window": 5, "scan": "eager"})
    assert all(e.candidates == {} for e in plain)  # only when asked
    final = model.args.num_hidden_layers - 1
    for e, lz in zip(eager, lazy, strict=True):
        assert sorted(e.candidates) == list(range(final - 4, final + 1))
        assert e.candidates[e.layer] == pytest.approx(e.entropy, rel=1e-5)
        # The lazy walk reads the final layer, each layer it steps down to, and the one that
        # stops it: a contiguous run from the top, the same entropies as the eager scan's.
        read = sorted(lz.candidates, reverse=True)
        assert read == list(range(final, final - len(read), -1))
        assert lz.layer == e.layer
        for layer in read:
            assert lz.candidates[layer] == pytest.approx(e.candidates[layer], rel=1e-4)
        below = min(read)
        assert (
            below == final - 4
            or (below == lz.layer - 1 and len(read) >= 2)
            or (below == final - 1 and lz.layer == final)
        )
    # An independent check of the values: the logit lens of the chosen layer.
    assert not any(math.isnan(v) for e in eager for v in e.candidates.values())


def test_candidates_of_dola_and_a_strategy_without_any(model):
    prompt = prompts_of_lengths(6, seed=4)[0]
    _, (dola,) = run(model, [prompt], "dola", {"layers": [0, 2]}, 5, candidates=True)
    final = model.args.num_hidden_layers - 1
    # HF's numbering in the params (0: the embeddings' output), 0-based layers in events.
    assert all(sorted(e.candidates) == [EMBEDDINGS, 1, final] for e in dola)
    assert all(e.candidates[final] == pytest.approx(e.entropy, rel=1e-5) for e in dola)
    _, (fixed,) = run(model, [prompt], "fixed", {"layer": 2}, 5, candidates=True)
    assert all(e.candidates == {2: e.entropy} for e in fixed)
