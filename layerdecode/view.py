"""LayerView: a lazy, batch-first view of one decoding step across the decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from .adapters import Adapter
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


def entropy_of(logits: mx.array) -> mx.array:
    """Shannon entropy (nats) over the last axis of unnormalised logits, in float32."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # exp(-inf) * -inf is nan; such terms contribute 0 to the entropy.
    terms = mx.where(mx.isinf(logprobs), 0.0, mx.exp(logprobs) * logprobs)
    return -mx.sum(terms, axis=-1)


class LayerView:
    """Per-layer hidden states, logits, logprobs and entropy for the last position.

    Everything is an unevaluated ``mx.array`` with the batch dimension first. The logits of
    the exits the strategy declared are computed together: one head call for all normed
    exits and one for all raw ones. The final layer's normed logits are the model's own
    output, untouched.
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
        self._logits: dict[tuple[int, bool], mx.array] = {(self.final_layer, True): final_logits}
        self._entropy: dict[tuple[int, bool], mx.array] = {}
        for norm in (True, False):
            layers = sorted(
                {e.layer for e in exits if e.norm == norm} - ({self.final_layer} if norm else set())
            )
            if not layers:
                continue
            stacked = mx.stack([self.hidden(layer) for layer in layers])
            decoded = adapter.decode(stacked, norm=norm)
            for i, layer in enumerate(layers):
                self._logits[(layer, norm)] = decoded[i]

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
        try:
            return self._logits[(layer, norm)]
        except KeyError:
            self._check_layer(layer)
            raise KeyError(
                f"layer {layer} (norm={norm}) was not declared by the strategy's exits()"
            ) from None

    def logprobs(self, layer: int, *, norm: bool = True) -> mx.array:
        """Log-probabilities ``(batch, vocab)`` of one exit, in float32."""
        logits = self.logits(layer, norm=norm).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def entropy(self, layer: int, *, norm: bool = True) -> mx.array:
        """Entropy ``(batch,)`` in nats of one exit's distribution."""
        key = (layer, norm)
        if key not in self._entropy:
            self._entropy[key] = entropy_of(self.logits(layer, norm=norm))
        return self._entropy[key]

    def stack_logits(self, layers: Sequence[int], *, norm: bool = True) -> mx.array:
        """Logits ``(len(layers), batch, vocab)`` of several exits."""
        return mx.stack([self.logits(layer, norm=norm) for layer in layers])

    @property
    def final_logits(self) -> mx.array:
        """The model's own logits ``(batch, vocab)``."""
        return self._final_logits

    def _check_layer(self, layer: int) -> None:
        if not (layer == EMBEDDINGS or 0 <= layer < self.num_layers):
            raise IndexError(
                f"layer {layer} is out of range: this model has decoder layers 0.."
                f"{self.num_layers - 1}"
            )
