"""``confident``: Confident Decoding (Zhang et al., arXiv 2606.21906).

Among the last ``window`` layers, each decoded through the final norm and head, walk back
from the final layer while the entropy strictly decreases and decode from where the walk
stops: the entropy valley nearest to the output, not the global minimum. The ``method``
names and their meaning follow the official implementation (QwenLM/Confident-Decoding).
"""

from __future__ import annotations

import math
from typing import Literal

import mlx.core as mx
from pydantic import Field, model_validator

from ..strategy import Decision, ModelFacts, Strategy, StrategyParams, final_layer_decision
from ..view import Exit, LayerView, entropy_of

Method = Literal[
    "trough",
    "trough-m1",
    "trough-m2",
    "trough-p1",
    "trough-p2",
    "last-m1",
    "last-m2",
    "last-m4",
    "last-m8",
]

# Shift applied to the valley, in candidate positions (clamped to the window).
_TROUGH_SHIFT = {"trough": 0, "trough-m1": -1, "trough-m2": -2, "trough-p1": 1, "trough-p2": 2}
DEFAULT_WINDOW = 10


class ConfidentParams(StrategyParams):
    window: int | None = Field(
        None,
        ge=1,
        description="Number of last decoder layers that are candidates, the final one "
        f"included (default {DEFAULT_WINDOW}; capped at the model's depth).",
    )
    window_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Candidates as a share of the model's layers, ceil(ratio * layers); "
        "use instead of window.",
    )
    method: Method = Field(
        "trough",
        description="trough: nearest entropy valley; trough-m1/m2: one/two layers below it; "
        "trough-p1/p2: one/two layers above it; last-mK: always the layer K below the final "
        "one (no entropy).",
    )
    p: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Probability of decoding a token from the selected layer instead of the "
        "final one (0 reproduces the final layer exactly).",
    )
    seed: int | None = Field(
        None,
        description="Seed of the draws that mix selected and final layers when p < 1 "
        "(default: MLX's global random state, which --seed sets).",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_window(cls, data):
        if isinstance(data, dict):
            window, ratio = data.get("window"), data.get("window_ratio")
            if window is not None and ratio is not None:
                raise ValueError("give either window or window_ratio, not both")
            if window is None and ratio is None:
                data = {**data, "window": DEFAULT_WINDOW}
        return data


class ConfidentStrategy(Strategy):
    name = "confident"
    description = (
        "Confident Decoding: decode each token from the nearest entropy valley among the "
        "last layers."
    )
    Params = ConfidentParams

    def prepare(self, model: ModelFacts) -> None:
        super().prepare(model)
        n = model.num_layers
        params = self.params
        if params.window is not None:
            count = min(n, params.window)
        else:
            count = max(1, math.ceil(n * params.window_ratio))
        self.first_candidate = n - count
        self.candidates = list(range(self.first_candidate, n))
        if params.method.startswith("last-m"):
            offset = int(params.method.removeprefix("last-m"))
            self.fixed_layer = min(max(n - 1 - offset, self.first_candidate), n - 1)
        else:
            self.fixed_layer = None
        self._key = mx.random.key(params.seed) if params.seed is not None else None

    def exits(self) -> list[Exit]:
        if self.params.p == 0.0:
            return []
        if self.fixed_layer is not None:
            return [Exit(self.fixed_layer), Exit(self.model.num_layers - 1)]
        return [Exit(layer) for layer in self.candidates]

    def select(self, view: LayerView) -> Decision:
        if self.params.p == 0.0:
            # Never the selected layer: the model's own output, with nothing else decoded.
            return final_layer_decision(view)
        if self.fixed_layer is not None:
            layers = [self.fixed_layer, view.final_layer]
            stacked = view.stack_logits(layers)
            entropy = mx.stack([view.entropy(layer) for layer in layers])
            chosen = mx.zeros((view.batch_size,), dtype=mx.int32)
        else:
            layers = self.candidates
            stacked = view.stack_logits(layers)
            entropy = entropy_of(stacked)  # (K, batch)
            chosen = self._valley(entropy)
        final_position = len(layers) - 1
        if self.params.p < 1.0:
            use_selected = self._uniform(view.batch_size) < self.params.p
            chosen = mx.where(use_selected, chosen, final_position)
        chosen = chosen.astype(mx.int32)
        logits = mx.take_along_axis(stacked, chosen[None, :, None], axis=0)[0]
        return Decision(
            logits=logits,
            layers=mx.array(layers, dtype=mx.int32)[chosen],
            entropy=mx.take_along_axis(entropy, chosen[None, :], axis=0)[0],
        )

    def _valley(self, entropy: mx.array) -> mx.array:
        """Candidate position of the nearest valley per row, shifted as ``method`` says."""
        k = entropy.shape[0]
        if k == 1:
            return mx.zeros((entropy.shape[1],), dtype=mx.int32)
        # decreasing[j] is True where stepping from candidate j+1 down to j lowers entropy;
        # the walk from the top stops at the first step that does not.
        decreasing = (entropy[:-1] < entropy[1:]).astype(mx.int32)[::-1]
        depth = mx.sum(mx.cumprod(decreasing, axis=0), axis=0)
        position = (k - 1) - depth
        shift = _TROUGH_SHIFT[self.params.method]
        if shift:
            position = mx.clip(position + shift, 0, k - 1)
        return position

    def _uniform(self, batch_size: int) -> mx.array:
        if self._key is None:
            return mx.random.uniform(shape=(batch_size,))
        self._key, key = mx.random.split(self._key)
        return mx.random.uniform(shape=(batch_size,), key=key)
