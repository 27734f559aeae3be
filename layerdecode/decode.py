"""The step factory: one decoding step for every loop (single stream, batch, server).

:class:`Decoder` does the per-generation setup once -- adapter, taps, the strategy
prepared for this model, its exits, sampler and logits processors -- and then builds
steps: forward pass with the layers tapped, :class:`~layerdecode.view.LayerView`, the
strategy's decision, processors, log-probabilities, sampler. :func:`pipelined` is the one
pipelining pattern, as in ``mlx_lm.generate.generate_step``: step n+1 is built and
``mx.async_eval``-ed before step n is handed out, so a strategy made of vectorised ``mx``
ops adds no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import TokenBuffer

from .adapters import get_adapter
from .strategy import Decision, ModelFacts, Strategy
from .taps import install_taps
from .view import LayerView

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logprobs, axis=-1)


class StepOutput(NamedTuple):
    """One step for every row, still lazy: sampled tokens, log-probabilities, decision."""

    tokens: mx.array  # (rows,)
    logprobs: mx.array  # (rows, vocab)
    decision: Decision

    def arrays(self) -> list[mx.array]:
        """Everything a consumer reads, for ``mx.async_eval``."""
        d = self.decision
        return [self.tokens, self.logprobs, d.layers, d.entropy, *d.extras.values()]

    def read(self) -> list[tuple[int, int, float, dict[str, int]]]:
        """Per row, back on the host: (token, layer, entropy, extras). This waits for the step."""
        d = self.decision
        tokens, layers, entropies = self.tokens.tolist(), d.layers.tolist(), d.entropy.tolist()
        extras = {k: v.tolist() for k, v in d.extras.items()}
        return [
            (tokens[i], layers[i], entropies[i], {k: v[i] for k, v in extras.items()})
            for i in range(len(tokens))
        ]

    def take(self, rows: mx.array) -> StepOutput:
        """The same step restricted to ``rows`` (indices into the current rows)."""
        d = self.decision
        decision = Decision(
            logits=d.logits[rows],
            layers=d.layers[rows],
            entropy=d.entropy[rows],
            extras={k: v[rows] for k, v in d.extras.items()},
        )
        return StepOutput(self.tokens[rows], self.logprobs[rows], decision)


class Decoder:
    """A model and a strategy set up for decoding; :meth:`step` builds one lazy step.

    Args:
        model: an mlx-lm model with a supported architecture (see ``adapters``).
        strategy: a strategy object; it is ``prepare``-d here for this model.
        sampler: maps log-probabilities ``(rows, vocab)`` to tokens; greedy by default.
        logits_processors: mlx-lm processors, applied to each row with its own history.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        *,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
    ) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.taps = install_taps(self.adapter.layers, self.adapter.hidden_of)
        strategy.prepare(
            ModelFacts(
                self.adapter.num_layers, self.adapter.tied_embeddings, self.adapter.model_type
            )
        )
        self.strategy = strategy
        self.exits = tuple(strategy.exits())
        self.sampler = sampler or greedy
        self.processors = list(logits_processors or [])

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def histories(self, prompts: Sequence[Sequence[int]]) -> list[TokenBuffer]:
        """Token histories the processors read, one per row (empty without processors)."""
        if not self.processors:
            return []
        return [TokenBuffer(list(p)) for p in prompts]

    def step(
        self, inputs: mx.array, cache: list[Any], histories: Sequence[TokenBuffer] = ()
    ) -> StepOutput:
        """Feed ``inputs`` ``(rows,)`` (one token per row) and decide the next tokens."""
        with mx.stream(generation_stream):
            with self.taps.capture() as capture:
                logits = self.model(inputs[:, None], cache=cache)
            view = LayerView(self.adapter, capture, logits[:, -1, :], self.exits)
            decision = self.strategy.select(view)
            logits = decision.logits
            if self.processors:
                logits = self._process(logits, inputs, histories)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return StepOutput(self.sampler(logprobs), logprobs, decision)

    def _process(
        self, logits: mx.array, inputs: mx.array, histories: Sequence[TokenBuffer]
    ) -> mx.array:
        rows = []
        for i, history in enumerate(histories):
            row = logits[i : i + 1] if len(histories) > 1 else logits
            tokens = history.update_and_fetch(inputs[i : i + 1])
            for processor in self.processors:
                row = processor(tokens, row)
            rows.append(row)
        return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)

    def prefill(
        self,
        prompt: mx.array,
        cache: list[Any],
        *,
        step_size: int = 2048,
        progress: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """Run all but the last prompt token through the model; return the last one."""
        progress = progress or (lambda *_: None)
        total = prompt.size
        done = 0
        progress(done, total)
        with mx.stream(generation_stream):
            while total - done > 1:
                n = min(step_size, total - done - 1)
                self.model(prompt[done : done + n][None], cache=cache)
                mx.eval([c.state for c in cache])
                done += n
                progress(done, total)
                mx.clear_cache()
        return prompt[-1:]


def top_logprobs(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one row's log-probabilities, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.size)
    ids = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[ids]
    pairs = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda p: -p[1])
    return [(int(i), float(v)) for i, v in pairs]


def remove_taps(model: nn.Module) -> None:
    """Give the model's decoder layers their own classes back.

    Decoding installs taps on the decoder layers once and leaves them (outside a step
    they only forward the call); after this the model is exactly as mlx-lm built it, and
    the next decoding call taps it again.
    """
    install_taps(get_adapter(model).layers).remove()


def pipelined(
    first: StepOutput,
    next_step: Callable[[StepOutput], StepOutput | None],
    settle: Callable[[StepOutput], StepOutput | None] | None = None,
) -> Generator[StepOutput, None, None]:
    """Yield steps, each one's successor already scheduled when it is handed out.

    ``next_step(current)`` builds the following step lazily from the current one's
    tokens, or returns ``None`` when ``current`` is the last. ``settle(upcoming)`` runs
    after the consumer has read ``current``: it may narrow the upcoming step to the rows
    still generating, or return ``None`` to stop.
    """
    current: StepOutput | None = first
    mx.async_eval(*first.arrays())
    while current is not None:
        upcoming = next_step(current)
        if upcoming is not None:
            mx.async_eval(*upcoming.arrays())
        yield current
        if upcoming is not None and settle is not None:
            upcoming = settle(upcoming)
        current = upcoming
