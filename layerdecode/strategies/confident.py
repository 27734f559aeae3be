"""``confident``: Confident Decoding (Zhang et al., arXiv 2606.21906).

Among the last ``window`` layers, each decoded through the final norm and head, walk back
from the final layer while the entropy strictly decreases and decode from where the walk
stops: the entropy valley nearest to the output, not the global minimum. The ``method``
names and their meaning follow the official implementation (QwenLM/Confident-Decoding).

The official code decodes every candidate (``scan: eager``: one head call over all of them).
``scan: lazy`` decodes the final layer and the one below it, then goes further down only
for the rows whose entropy is still falling: the same tokens and layers for far fewer head
products, at the price of a host synchronisation per round of the walk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
# Rows below which a further round of the lazy scan costs about one read of the head anyway.
_ROUND_ROWS = 4


@dataclass
class ScanStats:
    """Head products of a generation, counted per row and layer.

    ``projections`` are those decoded; ``walked`` (counted by the lazy scan) those the walk
    compared: the final layer, each layer it stepped down to and the one that stopped it,
    what a scan decoding one layer per round would decode. The eager scan decodes the window.
    """

    tokens: int = 0
    projections: int = 0
    walked: int = 0

    @property
    def per_token(self) -> float:
        return self.projections / max(self.tokens, 1)

    @property
    def walked_per_token(self) -> float:
        return self.walked / max(self.tokens, 1)


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
        description="Seed of the draws that mix selected and final layers when p < 1: each "
        "row draws from its own key made from it, the same alone or in a batch (default: the "
        "row's --seed; without either, MLX's global random state).",
    )
    scan: Literal["auto", "lazy", "eager"] = Field(
        "auto",
        description="eager: decode all candidates in one head call; lazy: walk down only "
        "while a row's entropy falls (same result, fewer head products, one host sync per "
        "round of the walk); auto: lazy on the CPU, eager on a GPU.",
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
        scan = params.scan
        if scan == "auto":
            # Measured on the CPU (docs/performance.md); on a GPU one head call over all
            # candidates reads the head's weights once and needs no host synchronisation.
            scan = "lazy" if mx.default_device() == mx.cpu else "eager"
        self.lazy = scan == "lazy" and self.fixed_layer is None and params.p > 0.0
        self.stats = ScanStats()
        self._twin: ConfidentStrategy | None = None

    @property
    def host_sync(self) -> bool:
        # The lazy scan reads each round's entropies on the host to decide who walks on.
        return self.lazy

    def new_state(self, seed: int | None = None) -> _Draws | None:
        """A row's own key for the draws of ``p < 1`` (the strategy's ``seed``, else the
        row's); without either, draws come from MLX's global random state."""
        if not 0.0 < self.params.p < 1.0:
            return None
        base = self.params.seed if self.params.seed is not None else seed
        return _Draws(mx.random.key(base)) if base is not None else None

    def log_probs(self, view: LayerView) -> mx.array:
        """With ``p < 1``, the mixture ``p * P_selected + (1 - p) * P_final`` a draw decodes
        from; otherwise the selected layer's distribution."""
        p = self.params.p
        if not 0.0 < p < 1.0:
            return super().log_probs(view)
        if self._twin is None:
            params = {**self.resolved_params(), "p": 1.0, "seed": None}
            params.pop("window_ratio" if params.get("window") is not None else "window", None)
            self._twin = type(self)(**params)
            self._twin.prepare(self.model)
        selected = Strategy.log_probs(self._twin, view)
        final = view.logprobs(view.final_layer)
        return mx.logaddexp(selected + math.log(p), final + math.log(1.0 - p))

    def exits(self) -> list[Exit]:
        if self.params.p == 0.0 or self.lazy:
            return []
        if self.fixed_layer is not None:
            return [Exit(self.fixed_layer), Exit(self.model.num_layers - 1)]
        return [Exit(layer) for layer in self.candidates]

    def select(self, view: LayerView) -> Decision:
        self.stats.tokens += view.batch_size
        if self.params.p == 0.0:
            # Never the selected layer: the model's own output, with nothing else decoded.
            self.stats.projections += view.batch_size
            return final_layer_decision(view)
        if self.lazy:
            return self._select_lazy(view)
        self.stats.projections += len(self.exits()) * view.batch_size
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
            use_selected = self._uniform(view) < self.params.p
            chosen = mx.where(use_selected, chosen, final_position)
        chosen = chosen.astype(mx.int32)
        logits = mx.take_along_axis(stacked, chosen[None, :, None], axis=0)[0]
        return Decision(
            logits=logits,
            layers=mx.array(layers, dtype=mx.int32)[chosen],
            entropy=mx.take_along_axis(entropy, chosen[None, :], axis=0)[0],
            final=stacked[-1],
            candidate_layers=tuple(layers),
            candidate_entropy=entropy.T,
        )

    def _select_lazy(self, view: LayerView) -> Decision:
        """The walk of :meth:`_valley`, decoding each layer only for the rows that reach it."""
        batch, final, first = view.batch_size, view.final_layer, self.first_candidate
        top = [final, final - 1] if final - 1 >= first else [final]
        logits = view.decode_rows(top)  # (len(top), batch, vocab)
        entropy = entropy_of(logits)
        blocks, entropies = [logits.reshape(-1, logits.shape[-1])], [entropy.reshape(-1)]
        # where[(row, layer)]: that row's logits of that layer among the concatenated blocks
        where = {
            (row, layer): i * batch + row for i, layer in enumerate(top) for row in range(batch)
        }
        size = len(top) * batch
        use = [True] * batch
        checks = [entropy[1] < entropy[0]] if len(top) == 2 else []
        if self.params.p < 1.0:
            checks.append(self._uniform(view) < self.params.p)
        mx.eval(checks)
        if self.params.p < 1.0:
            use = checks.pop().tolist()
        falling = checks[0].tolist() if checks else [False] * batch
        valley = [final] * batch
        walking = [row for row in range(batch) if use[row] and falling[row]]
        for row in walking:
            valley[row] = final - 1
        previous, position = entropy[1] if len(top) == 2 else None, list(range(batch))
        layer = final - 2
        while walking and layer >= first:
            # Each round re-reads the head's weights: give it about as many rows as the first.
            depth = min(layer - first + 1, -(-max(_ROUND_ROWS, 2 * batch) // len(walking)))
            layers = list(range(layer, layer - depth, -1))
            block = view.decode_rows(layers, mx.array(walking))  # (depth, rows, vocab)
            block_entropy = entropy_of(block)
            above = previous[mx.array([position[row] for row in walking])][None]
            falls = block_entropy < mx.concatenate([above, block_entropy[:-1]])
            falls = falls.tolist()  # the host decides which rows go further down
            for j, deeper in enumerate(layers):
                for i, row in enumerate(walking):
                    where[(row, deeper)] = size + j * len(walking) + i
            blocks.append(block.reshape(-1, block.shape[-1]))
            entropies.append(block_entropy.reshape(-1))
            size += depth * len(walking)
            still = []
            for i, row in enumerate(walking):
                for j, deeper in enumerate(layers):
                    if not falls[j][i]:
                        break
                    valley[row] = deeper
                else:
                    still.append(i)
            previous = block_entropy[-1]
            position = {row: i for i, row in enumerate(walking)}
            walking = [walking[i] for i in still]
            layer -= depth
        shift = _TROUGH_SHIFT[self.params.method]
        chosen = [
            min(max(valley[row] + shift, first), final) if use[row] else final
            for row in range(batch)
        ]
        missing: dict[int, list[int]] = {}
        for row, layer in enumerate(chosen):
            if (row, layer) not in where:  # below the walk: trough-m1/m2
                missing.setdefault(layer, []).append(row)
        for layer, rows in missing.items():
            block = view.decode_rows([layer], mx.array(rows))[0]
            for i, row in enumerate(rows):
                where[(row, layer)] = size + i
            blocks.append(block)
            entropies.append(entropy_of(block))
            size += len(rows)
        self.stats.projections += size
        self.stats.walked += sum(
            final - valley[row] + (2 if valley[row] > first else 1) if use[row] else 1
            for row in range(batch)
        )
        index = mx.array([where[(row, layer)] for row, layer in enumerate(chosen)])
        if len(blocks) > 1:
            blocks, entropies = [mx.concatenate(blocks)], [mx.concatenate(entropies)]
        # Every layer a row read, as a (rows, candidates) matrix: NaN where it read none.
        read = mx.array(
            [[where.get((row, layer), size) for layer in self.candidates] for row in range(batch)]
        )
        padded = mx.concatenate([entropies[0], mx.array([math.nan], dtype=entropies[0].dtype)])
        return Decision(
            logits=blocks[0][index],
            layers=mx.array(chosen, dtype=mx.int32),
            entropy=entropies[0][index],
            final=logits[0],
            candidate_layers=tuple(self.candidates),
            candidate_entropy=padded[read],
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

    def _uniform(self, view: LayerView) -> mx.array:
        """One uniform draw per row: from the row's own key if it has one."""
        states = view.states
        if all(state is None for state in states):
            return mx.random.uniform(shape=(view.batch_size,))
        draws = []
        for state in states:
            if state is None:
                draws.append(mx.random.uniform(shape=(1,)))
            else:
                state.key, key = mx.random.split(state.key)
                draws.append(mx.random.uniform(shape=(1,), key=key))
        return draws[0] if len(draws) == 1 else mx.concatenate(draws)


@dataclass
class _Draws:
    """A row's random key for the draws of ``p < 1``."""

    key: mx.array
