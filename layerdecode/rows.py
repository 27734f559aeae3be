"""The engine's records: a live row, a step's lazy arrays, and how rows are gathered.

Private to :mod:`layerdecode.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import TokenBuffer

from .events import LogitsProcessor, Plan, Sampler
from .strategy import Decision, ModelFacts, Strategy
from .taps import Capture
from .text import OutputStream

# -- rows and strategy groups ----------------------------------------------------------------


class Group:
    """The rows that share one strategy object."""

    def __init__(self, strategy: Strategy, facts: ModelFacts) -> None:
        strategy.prepare(facts)
        self.strategy = strategy
        self.exits = tuple(strategy.exits())


@dataclass(eq=False)
class Row:
    key: Hashable
    prompt: list[int]
    plan: Plan
    group: Group
    state: Any
    sampler: Sampler | None  # None: greedy
    keyed: Callable[[mx.array, mx.array], mx.array] | None  # a seeded row's sampler
    random_key: mx.array | None
    processors: list[LogitsProcessor]
    history: TokenBuffer | None
    output: OutputStream | None
    max_tokens: int
    stop_tokens: frozenset[int]
    prompt_cache: list[Any] | None = None
    cached: int = 0  # prompt tokens the given prompt cache holds already
    on_cache: Callable[[list[int], list[Any]], None] | None = None
    progress: Callable[[int, int], None] | None = None
    cache: list[Any] | None = None  # its own caches while it is prefilled
    filled: int = 0  # prompt tokens in its caches
    prefill_seconds: float = 0.0
    count: int = 0
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # tokens in the row's caches once its step runs
    cancelled: bool = False
    twins: list[Row] = field(default_factory=list)  # rows of the same prompt, one prefill
    done: bool = False
    prompt_tps: float = 0.0
    tic: float = 0.0

    def budget_ends_next(self) -> bool:
        return 0 < self.max_tokens <= self.count + 1


class RowsCapture:
    """The captured hidden states of some rows of a step (sliced when read)."""

    def __init__(self, capture: Capture, index: mx.array) -> None:
        self._capture, self._index = capture, index

    @property
    def embeddings(self) -> mx.array | None:
        h = self._capture.embeddings
        return None if h is None else h[self._index]

    @property
    def outputs(self) -> RowsOutputs:
        return RowsOutputs(self._capture.outputs, self._index)


class RowsOutputs:
    def __init__(self, outputs: list[Any], index: mx.array) -> None:
        self._outputs, self._index = outputs, index

    def __getitem__(self, layer: int) -> mx.array | None:
        h = self._outputs[layer]
        return None if h is None else h[self._index]

    def __len__(self) -> int:
        return len(self._outputs)


@dataclass
class Step:
    """One step for every row, still lazy."""

    tokens: mx.array  # (rows,)
    logprobs: mx.array  # (rows, vocab)
    layers: mx.array  # (rows,)
    entropy: mx.array  # (rows,)
    extras: list[tuple[list[int], dict[str, mx.array]]]  # (row positions, arrays) per group
    changed: mx.array | None  # (rows,) 1, 0, or -1 (unknown); None: no row can change
    head_rows: mx.array  # (rows,)
    # (row positions, layers, (rows, layers) entropies) per group that reports candidates;
    # read only for the rows that ask for them.
    candidates: list[tuple[list[int], tuple[int, ...], mx.array]]

    def arrays(self) -> list[mx.array]:
        out = [self.tokens, self.logprobs, self.layers, self.entropy, self.head_rows]
        if self.changed is not None:
            out.append(self.changed)
        for _, extras in self.extras:
            out.extend(extras.values())
        return out

    def take(self, keep: list[int]) -> Step:
        index = mx.array(keep)
        where = {old: new for new, old in enumerate(keep)}

        def kept_rows(positions: list[int]) -> tuple[list[int], mx.array] | None:
            kept = [(i, where[p]) for i, p in enumerate(positions) if p in where]
            if not kept:
                return None
            return [p for _, p in kept], mx.array([i for i, _ in kept])

        extras = []
        for positions, arrays in self.extras:
            if (found := kept_rows(positions)) is not None:
                extras.append((found[0], {k: v[found[1]] for k, v in arrays.items()}))
        candidates = []
        for positions, layers, values in self.candidates:
            if (found := kept_rows(positions)) is not None:
                candidates.append((found[0], layers, values[found[1]]))
        return Step(
            self.tokens[index], self.logprobs[index], self.layers[index], self.entropy[index],
            extras, None if self.changed is None else self.changed[index],
            self.head_rows[index], candidates,
        )  # fmt: skip


def in_row_order(
    decided: list[tuple[list[int], Decision, mx.array]], rows: int
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The groups' logits, layers, entropies and head rows, put back in the rows' order."""
    if len(decided) == 1:
        _, d, head = decided[0]
        return d.logits, d.layers.astype(mx.int32), d.entropy.astype(mx.float32), head
    return (
        scatter([(p, d.logits) for p, d, _ in decided], rows),
        scatter([(p, d.layers.astype(mx.int32)) for p, d, _ in decided], rows),
        scatter([(p, d.entropy.astype(mx.float32)) for p, d, _ in decided], rows),
        scatter([(p, head) for p, _, head in decided], rows),
    )


def others(positions: list[int], rows: list[Any]) -> list[int]:
    taken = set(positions)
    return [p for p in range(len(rows)) if p not in taken]


def scatter(parts: list[tuple[list[int], mx.array]], rows: int) -> mx.array:
    """Arrays computed for groups of row positions, as one array in the rows' order."""
    order = [p for positions, _ in parts for p in positions]
    stacked = mx.concatenate([a for _, a in parts], axis=0)
    if order == list(range(rows)):
        return stacked
    inverse = [0] * rows
    for i, p in enumerate(order):
        inverse[p] = i
    return stacked[mx.array(inverse)]
