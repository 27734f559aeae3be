"""``final``: the model's own output, exactly as ``mlx_lm.generate`` decodes it."""

from __future__ import annotations

from ..strategy import Decision, Strategy, StrategyParams, final_layer_decision
from ..view import LayerView


class FinalParams(StrategyParams):
    pass


class FinalStrategy(Strategy):
    name = "final"
    description = "Decode every token from the final layer (the model's own output)."
    Params = FinalParams

    def select(self, view: LayerView) -> Decision:
        return final_layer_decision(view)
