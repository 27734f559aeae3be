"""A layerdecode strategy plugin: decode each token from its most confident late layer.

Among the last ``window`` decoder layers, each decoded through the final norm and head,
the layer whose next-token distribution has the lowest entropy wins, per token and per
row of the batch.
"""

from __future__ import annotations

import mlx.core as mx
from pydantic import Field

from layerdecode import Decision, Exit, LayerView, ModelFacts, Strategy, StrategyParams, entropy_of


class MinEntropyParams(StrategyParams):
    window: int = Field(
        8,
        ge=1,
        description="Number of last decoder layers that are candidates, the final one "
        "included (capped at the model's depth).",
    )


class MinEntropyStrategy(Strategy):
    name = "min-entropy"
    description = "Decode each token from the lowest-entropy layer among the last layers."
    Params = MinEntropyParams

    def prepare(self, model: ModelFacts) -> None:
        super().prepare(model)
        n = model.num_layers
        self.candidates = list(range(max(0, n - self.params.window), n))

    def exits(self) -> list[Exit]:
        return [Exit(layer) for layer in self.candidates]

    def select(self, view: LayerView) -> Decision:
        logits = view.stack_logits(self.candidates)  # (window, batch, vocab)
        entropy = entropy_of(logits)  # (window, batch)
        chosen = mx.argmin(entropy, axis=0)  # (batch,): position within the window
        return Decision(
            logits=mx.take_along_axis(logits, chosen[None, :, None], axis=0)[0],
            layers=mx.array(self.candidates, dtype=mx.int32)[chosen],
            entropy=mx.take_along_axis(entropy, chosen[None, :], axis=0)[0],
        )
