"""Per-position scoring through a strategy: the distribution it would decode from, everywhere.

A forward pass over a whole sequence records every layer's hidden states (the same taps as
decoding). The positions to score are then gathered into rows of a batch, and the
strategy's ``select`` runs on them exactly as a decoding step runs it on the rows of a
batch: the same exits, one head call per chunk of positions, the same logits processing
inside the strategy. Only the gathered positions are decoded, in chunks of ``chunk``
rows, so memory stays bounded by ``chunk x exits x vocab``.

Two things a decoding step does by drawing become exact here:

- ``confident`` with ``p < 1`` decodes a token from the selected layer with probability
  ``p`` and from the final layer otherwise; its score is the log of the mixture
  ``p * P_selected + (1 - p) * P_final``.
- A token the strategy masks out (a ``-inf`` logit, as DoLa's plausibility filter gives)
  scores ``masked_logprob`` (default -1000, the value DoLa's own scorer uses), so one
  implausible token does not make every answer ``-inf`` and tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from layerdecode.decode import Decoder
from layerdecode.strategies.confident import ConfidentStrategy
from layerdecode.strategy import Strategy
from layerdecode.taps import Capture
from layerdecode.view import LayerView


class ForwardPass(NamedTuple):
    """One model call: the recorded hidden states and the model's own logits ``(B, T, V)``."""

    capture: Capture
    logits: mx.array


class Scores(NamedTuple):
    """Per scored position: log-probability of the target and whether it was the argmax."""

    logprobs: mx.array  # (N,) float32
    greedy: mx.array  # (N,) bool


def _log_softmax(logits: mx.array) -> mx.array:
    return nn.log_softmax(logits.astype(mx.float32))


def _mixture_twin(strategy: Strategy) -> tuple[float, Strategy] | None:
    """``(p, the same strategy with p = 1)`` for a strategy that mixes layers by drawing."""
    if isinstance(strategy, ConfidentStrategy) and 0.0 < strategy.params.p < 1.0:
        params = {**strategy.resolved_params(), "p": 1.0, "seed": None}
        if params.get("window") is not None:
            params.pop("window_ratio", None)
        else:
            params.pop("window", None)
        return strategy.params.p, type(strategy)(**params)
    return None


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
        twin = _mixture_twin(strategy)
        self.mix_p = twin[0] if twin else None
        self.decoder = Decoder(model, twin[1] if twin else strategy)
        self.model = model
        self.chunk = chunk
        self.masked_logprob = masked_logprob

    def forward(self, tokens: mx.array, cache: list[Any] | None = None) -> ForwardPass:
        """Run ``tokens`` ``(B, T)`` through the model, recording every layer (lazily)."""
        with self.decoder.taps.capture() as capture:
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
        return LayerView(
            self.decoder.adapter, gathered, passed.logits[rows, positions], self.decoder.exits
        )

    def logprobs(self, view: LayerView) -> mx.array:
        """Log-probabilities ``(rows, vocab)`` of what the strategy decodes from, in float32."""
        decision = self.decoder.strategy.select(view)
        logprobs = _log_softmax(decision.logits)
        if self.mix_p is not None:
            final = view.logprobs(view.final_layer)
            logprobs = mx.logaddexp(
                logprobs + math.log(self.mix_p), final + math.log(1.0 - self.mix_p)
            )
        return logprobs

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
