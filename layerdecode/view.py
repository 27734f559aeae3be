"""LayerView: a lazy, batch-first view of one decoding step across the decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .adapters import Adapter
from .fastmath import exp_shifted, log_softmax
from .taps import Capture

EMBEDDINGS = -1
"""Layer index of the embedding output (the input of decoder layer 0); only DoLa reads it."""


@dataclass(frozen=True)
class Exit:
    """A place a strategy may decode from.

    Attributes:
        layer: 0-based decoder layer (``num_layers - 1`` is the final layer), or
            :data:`EMBEDDINGS` for the embedding output.
        norm: decode through the model's final norm (``head(norm(h))``); ``False``
            applies the head to the raw hidden state, as HF's DoLa does.
    """

    layer: int
    norm: bool = True


# On the CPU, entropies are computed this many rows at a time: the passes over a few rows of
# the vocabulary stay in the cache (about twice as fast for 76 rows of 49,152), same values.
ENTROPY_CHUNK_ROWS = 8


def entropy_of(logits: mx.array) -> mx.array:
    """Shannon entropy (nats) over the last axis of unnormalised logits, in float32.

    ``H = log Z - sum(e * d) / Z`` with ``d = x - max(x)``, ``e = exp(d)``, ``Z = sum(e)``:
    one exponential per element. Masked (``-inf``) logits contribute nothing.
    """
    rows = logits.size // max(logits.shape[-1], 1) if logits.ndim > 1 else 1
    if rows > ENTROPY_CHUNK_ROWS and mx.default_device() == mx.cpu:
        flat = logits.reshape(rows, logits.shape[-1])
        step = ENTROPY_CHUNK_ROWS
        parts = [_entropy(flat[i : i + step]) for i in range(0, rows, step)]
        return mx.concatenate(parts).reshape(logits.shape[:-1])
    return _entropy(logits)


def _entropy(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    shifted = logits - mx.max(logits, axis=-1, keepdims=True)
    weights = exp_shifted(shifted)
    total = mx.sum(weights, axis=-1)
    # exp(-inf) * -inf is nan; such terms contribute 0 to the entropy.
    terms = mx.where(weights > 0, weights * shifted, 0.0)
    return mx.log(total) - mx.sum(terms, axis=-1) / total


class LayerView:
    """Per-layer hidden states, logits, logprobs and entropy for the last position.

    Everything is an unevaluated ``mx.array`` with the batch dimension first. The logits of
    the exits the strategy declared are computed together, in one head call. The model's
    own output is always available as :attr:`final_logits` (and as the final layer's logits
    when no other exit was declared); it costs nothing unless a strategy uses it.
    """

    def __init__(
        self,
        adapter: Adapter,
        capture: Capture,
        final_logits: mx.array,
        exits: Sequence[Exit] = (),
    ) -> None:
        self.adapter = adapter
        self.num_layers = adapter.num_layers
        self.final_layer = self.num_layers - 1
        self._capture = capture
        self._final_logits = final_logits
        self.batch_size = final_logits.shape[0]
        # Per row, the state its strategy made with ``new_state`` (set by the engine).
        self.states: list[Any] = [None] * self.batch_size
        self._logits: dict[tuple[int, bool], mx.array] = {}
        self._entropy: dict[tuple[int, bool], mx.array] = {}
        self._position: dict[tuple[int, bool], int] = {}
        self._stack = None
        # Head rows paid per row: the exits' stack, rows decoded at run time, the model's
        # own head when it is read (see :meth:`head_rows`).
        self._stacked_rows = 0
        self._run_time_rows: list[tuple[mx.array | None, int]] = []
        self._own_head_read = False
        final = (self.final_layer, True)
        wanted = list(dict.fromkeys((e.layer, e.norm) for e in exits))
        if wanted in ([], [final]):
            # Alone, the final layer is the model's own output, bit for bit.
            return
        # Every exit goes through the head in one call: one pass over the head's weights,
        # which costs about as much as decoding a single row. The model's own head output is
        # then never evaluated.
        normed = [key for key in wanted if key[1]]
        raw = [key for key in wanted if not key[1]]
        parts = []
        if normed:
            parts.append(adapter.norm(mx.stack([self.hidden(layer) for layer, _ in normed])))
        if raw:
            parts.append(mx.stack([self.hidden(layer) for layer, _ in raw]))
        stacked = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        self._stack = adapter.decode(stacked, norm=False)
        self._stacked_rows = len(wanted)
        for position, key in enumerate(normed + raw):
            self._position[key] = position

    def hidden(self, layer: int) -> mx.array:
        """Hidden state ``(batch, hidden_size)`` at the last position after ``layer``."""
        if layer == EMBEDDINGS:
            h = self._capture.embeddings
        else:
            self._check_layer(layer)
            h = self._capture.outputs[layer]
        if h is None:
            raise RuntimeError(f"layer {layer} was not captured in this step")
        return h[:, -1, :]

    def logits(self, layer: int, *, norm: bool = True) -> mx.array:
        """Logits ``(batch, vocab)`` of one exit. It must be among the declared exits."""
        key = (layer, norm)
        if key not in self._logits:
            if key == (self.final_layer, True) and key not in self._position:
                return self.final_logits
            if key not in self._position:
                self._check_layer(layer)
                raise KeyError(
                    f"layer {layer} (norm={norm}) was not declared by the strategy's exits()"
                )
            self._logits[key] = self._stack[self._position[key]]
        return self._logits[key]

    def logprobs(self, layer: int, *, norm: bool = True) -> mx.array:
        """Log-probabilities ``(batch, vocab)`` of one exit, in float32."""
        return log_softmax(self.logits(layer, norm=norm).astype(mx.float32))

    def entropy(self, layer: int, *, norm: bool = True) -> mx.array:
        """Entropy ``(batch,)`` in nats of one exit's distribution."""
        key = (layer, norm)
        if key not in self._entropy:
            self._entropy[key] = entropy_of(self.logits(layer, norm=norm))
        return self._entropy[key]

    def stack_logits(self, layers: Sequence[int], *, norm: bool = True) -> mx.array:
        """Logits ``(len(layers), batch, vocab)`` of several exits."""
        positions = [self._position.get((layer, norm)) for layer in layers]
        first = positions[0] if positions else None
        if first is not None and positions == list(range(first, first + len(layers))):
            return self._stack[first : first + len(layers)]  # already stacked: no copy
        return mx.stack([self.logits(layer, norm=norm) for layer in layers])

    def decode_rows(
        self, layers: Sequence[int], rows: mx.array | None = None, *, norm: bool = True
    ) -> mx.array:
        """Logits ``(len(layers), rows, vocab)`` of any layers for some rows, in one head call.

        For strategies that decide at run time what else to decode (confident's lazy scan):
        nothing needs declaring, and only the ``rows`` given (indices; all by default) pay
        for the head. Each row's logits are computed as for a declared exit.
        """
        hidden = mx.stack([self.hidden(layer) for layer in layers])
        if rows is not None:
            hidden = hidden[:, rows]
        self._run_time_rows.append((rows, len(layers)))
        if norm:
            hidden = self.adapter.norm(hidden)
        return self.adapter.decode(hidden, norm=False)

    @property
    def decoded(self) -> list[tuple[int, bool]]:
        """The exits decoded in this step, as (layer, norm) pairs."""
        own = {(self.final_layer, True)} if self._own_head_read else set()
        return sorted(set(self._logits) | set(self._position) | own)

    @property
    def final_logits(self) -> mx.array:
        """The model's own logits ``(batch, vocab)``."""
        self._own_head_read = True
        return self._final_logits

    def head_rows(self) -> mx.array:
        """Vocabulary-head rows ``(batch,)`` decoded so far for each row, the model's own
        output included once read: what the step cost in head projections."""
        base = self._stacked_rows + int(self._own_head_read)
        counts = mx.full((self.batch_size,), base, dtype=mx.int32)
        for rows, n in self._run_time_rows:
            counts = counts + n if rows is None else counts.at[rows].add(n)
        return counts

    def _check_layer(self, layer: int) -> None:
        if not (layer == EMBEDDINGS or 0 <= layer < self.num_layers):
            raise IndexError(
                f"layer {layer} is out of range: this model has decoder layers 0.."
                f"{self.num_layers - 1}"
            )
