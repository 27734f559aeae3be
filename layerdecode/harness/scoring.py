"""Per-position scoring through a strategy: the distribution it would decode from, everywhere.

A forward pass over a whole sequence records every layer's hidden states (the same taps as
decoding). The positions to score are then gathered into rows of a batch, and the
strategy's ``select`` runs on them exactly as a decoding step runs it on the rows of a
batch: the same exits, one head call per chunk of positions, the same logits processing
inside the strategy. Only the gathered positions are decoded, in chunks of ``chunk``
rows, so memory stays bounded by ``chunk x exits x vocab``.

Each position is scored with the distribution the strategy says it decodes from
(:meth:`~layerdecode.strategy.Strategy.log_probs`): for a strategy that draws between layers,
as ``confident`` with ``p < 1`` does, the mixture of what it draws from. A token the
strategy masks out (a ``-inf`` logit, as DoLa's plausibility filter gives)
  scores ``masked_logprob`` (default -1000, the value DoLa's own scorer uses), so one
  implausible token does not make every answer ``-inf`` and tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from layerdecode.adapters import get_adapter
from layerdecode.strategy import Strategy, model_facts
from layerdecode.taps import Capture, install_taps
from layerdecode.view import LayerView


class ForwardPass(NamedTuple):
    """One model call: the recorded hidden states and the model's own logits ``(B, T, V)``."""

    capture: Capture
    logits: mx.array


class Scores(NamedTuple):
    """Per scored position: log-probability of the target and whether it was the argmax."""

    logprobs: mx.array  # (N,) float32
    greedy: mx.array  # (N,) bool


class PositionScorer:
    """Scores positions of sequences with the distribution ``strategy`` decodes from.

    Args:
        model: an mlx-lm model with a supported architecture.
        strategy: a strategy object (prepared here for ``model``).
        chunk: scored positions decoded together.
        masked_logprob: the score of a token the strategy gives a ``-inf`` logit.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        *,
        chunk: int = 64,
        masked_logprob: float = -1000.0,
    ) -> None:
        self.adapter = get_adapter(model)
        self.taps = install_taps(self.adapter.layers, self.adapter.hidden_of)
        strategy.prepare(model_facts(self.adapter))
        self.strategy, self.exits = strategy, tuple(strategy.exits())
        self.model = model
        self.chunk = chunk
        self.masked_logprob = masked_logprob

    def forward(self, tokens: mx.array, cache: list[Any] | None = None) -> ForwardPass:
        """Run ``tokens`` ``(B, T)`` through the model, recording every layer (lazily)."""
        with self.taps.capture() as capture:
            logits = self.model(tokens, cache=cache)
        return ForwardPass(capture, logits)

    def view(self, passed: ForwardPass, rows: mx.array, positions: mx.array) -> LayerView:
        """A :class:`LayerView` whose batch rows are the given (row, position) pairs."""
        capture = passed.capture
        gathered = Capture(len(capture.outputs))
        gathered.outputs = [
            None if h is None else h[rows, positions][:, None, :] for h in capture.outputs
        ]
        if capture.embeddings is not None:
            gathered.embeddings = capture.embeddings[rows, positions][:, None, :]
        return LayerView(self.adapter, gathered, passed.logits[rows, positions], self.exits)

    def logprobs(self, view: LayerView) -> mx.array:
        """Log-probabilities ``(rows, vocab)`` of what the strategy decodes from, in float32."""
        return self.strategy.log_probs(view)

    def pick(self, logprobs: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
        """Per row of ``logprobs`` ``(rows, vocab)``: the target's score (a masked target
        scores ``masked_logprob``) and whether it is the argmax."""
        picked = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        picked = mx.where(picked == -mx.inf, self.masked_logprob, picked)
        return picked, mx.argmax(logprobs, axis=-1) == targets

    def score(
        self,
        passed: ForwardPass,
        rows: Sequence[int],
        positions: Sequence[int],
        targets: Sequence[int],
    ) -> Scores:
        """Scores of ``targets`` at the (row, position) pairs of one forward pass, evaluated."""
        outs, greedy = [], []
        for start in range(0, len(positions), self.chunk):
            end = start + self.chunk
            view = self.view(
                passed, mx.array(list(rows[start:end])), mx.array(list(positions[start:end]))
            )
            picked, best = self.pick(self.logprobs(view), mx.array(list(targets[start:end])))
            mx.eval(picked, best)
            outs.append(picked)
            greedy.append(best)
            mx.clear_cache()
        if not outs:
            return Scores(mx.zeros((0,), dtype=mx.float32), mx.zeros((0,), dtype=mx.bool_))
        return Scores(mx.concatenate(outs), mx.concatenate(greedy))
