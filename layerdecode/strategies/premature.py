"""What DoLa and SLED share: premature layers named in HF's numbering, read with the final one.

HF's numbering (``output_hidden_states``): 0 is the embedding output, ``i`` the output of
decoder layer ``i`` counting from 1, so a model with ``N`` decoder layers has premature
layers ``0..N-1``. Both strategies decode their premature layers (with or without the final
norm) and the final layer in one head call.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import field_validator

from ..errors import ConfigError
from ..strategy import ModelFacts, Strategy, StrategyParams
from ..view import EMBEDDINGS, Exit


class PrematureParams(StrategyParams):
    """Base of the params of a :class:`PrematureLayersStrategy` (``layers`` is theirs)."""

    @field_validator("layers", check_fields=False)
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one premature layer")
        return value


def checked_hf_layers(strategy: str, layers: Sequence[int], num_layers: int) -> list[int]:
    """An explicit list of HF-numbered premature layers, in range, without repeats."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"{strategy}: premature layers {bad} are out of range; in HF numbering a model with "
            f"{num_layers} decoder layers has premature layers 0..{num_layers - 1} "
            "(0 = embedding output)."
        )
    return sorted(set(layers), key=list(layers).index)


class PrematureLayersStrategy(Strategy):
    """A strategy that reads HF-numbered premature layers beside the final layer.

    Subclasses implement :meth:`hf_layers`; their params have ``layers`` and
    ``premature_norm``. After ``prepare``, :attr:`premature` holds the layers in
    layerdecode's numbering (:data:`~layerdecode.view.EMBEDDINGS` for HF's 0).
    """

    premature: list[int]

    def hf_layers(self, model: ModelFacts) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, model: ModelFacts) -> None:
        super().prepare(model)
        hf_layers = self.hf_layers(model)
        if not hf_layers:
            raise ConfigError(
                f"{self.name}: layers={self.params.layers!r} selects no premature layer for a "
                f"model with {model.num_layers} decoder layers; list the layers explicitly."
            )
        # HF index i is the output of decoder layer i - 1 (0-based); 0 is the embeddings.
        self.premature = [i - 1 if i > 0 else EMBEDDINGS for i in hf_layers]

    def exits(self) -> list[Exit]:
        norm = self.params.premature_norm
        return [Exit(layer, norm=norm) for layer in self.premature] + [
            Exit(self.model.num_layers - 1)
        ]
