"""``fixed``: decode every token from one decoder layer (the logit lens)."""

from __future__ import annotations

import mlx.core as mx
from pydantic import Field

from ..errors import ConfigError
from ..strategy import Decision, ModelFacts, Strategy, StrategyParams
from ..view import Exit, LayerView


class FixedParams(StrategyParams):
    layer: int = Field(
        -1,
        description="0-based decoder layer to decode from; negative counts from the end "
        "(-1 is the final layer).",
    )


class FixedStrategy(Strategy):
    name = "fixed"
    description = "Decode every token from one decoder layer through the final norm and head."
    Params = FixedParams

    def prepare(self, model: ModelFacts) -> None:
        super().prepare(model)
        num_layers = model.num_layers
        layer = self.params.layer
        if not -num_layers <= layer < num_layers:
            raise ConfigError(
                f"fixed: layer {layer} is out of range for a model with {num_layers} decoder "
                f"layers; use 0..{num_layers - 1} or -{num_layers}..-1."
            )
        self.layer = layer % num_layers

    def exits(self) -> list[Exit]:
        return [Exit(self.layer)]

    def select(self, view: LayerView) -> Decision:
        return Decision(
            logits=view.logits(self.layer),
            layers=mx.full((view.batch_size,), self.layer, dtype=mx.int32),
            entropy=view.entropy(self.layer),
        )
