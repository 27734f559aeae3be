"""``dola``: DoLa, Decoding by Contrasting Layers (Chuang et al., ICLR 2024).

Semantics follow Hugging Face transformers' ``dola_layers`` decoding, so settings carry
over: ``layers`` uses HF's numbering (0 = embedding output, i = output of the i-th decoder
layer counting from 1); among the candidate premature layers the one with the largest
Jensen-Shannon divergence from the final layer is chosen; tokens outside the final layer's
relative-top set are masked; the output is ``log_softmax(final) - log_softmax(premature)``.
One difference: HF averages the divergence over the batch and picks one premature layer
for all rows; layerdecode picks it per row (identical for a single prompt).
"""

from __future__ import annotations

import math
from typing import Literal

import mlx.core as mx
from pydantic import Field

from ..fastmath import log_softmax, softmax_and_log
from ..strategy import Decision, ModelFacts
from ..view import LayerView
from .premature import PrematureLayersStrategy, PrematureParams, checked_hf_layers


class DoLaParams(PrematureParams):
    layers: Literal["high", "low"] | list[int] = Field(
        "high",
        description="Candidate premature layers: 'high', 'low' or a list, in HF's numbering "
        "(0 = embedding output, i = output of decoder layer i counting from 1).",
    )
    relative_top: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Keep only tokens whose final-layer probability is at least this share "
        "of the top token's.",
    )
    premature_norm: bool = Field(
        False,
        description="Decode premature layers through the final norm (HF applies the head to "
        "the raw hidden state).",
    )


def candidate_layers(spec, num_layers: int, tied_embeddings: bool) -> list[int]:
    """HF's candidate premature layers (HF numbering) for a model of ``num_layers`` layers."""
    n = num_layers
    if isinstance(spec, list):
        return checked_hf_layers("dola", spec, n)
    if not tied_embeddings:
        start = 0
    elif n > 2:
        start = 2
    elif n == 2:
        start = 1
    else:
        start = 0
    if spec == "low":
        if start == n // 2:
            return [start]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))


class DoLaStrategy(PrematureLayersStrategy):
    name = "dola"
    description = "DoLa: contrast the final layer with the most divergent earlier layer (HF)."
    Params = DoLaParams

    def hf_layers(self, model: ModelFacts) -> list[int]:
        return candidate_layers(self.params.layers, model.num_layers, model.tied_embeddings)

    def select(self, view: LayerView) -> Decision:
        norm = self.params.premature_norm
        final = view.final_layer
        final_logits = view.logits(final)
        final_p, final_lp = softmax_and_log(final_logits)
        if len(self.premature) == 1:
            chosen = mx.zeros((view.batch_size,), dtype=mx.int32)
            base_lp = log_softmax(view.logits(self.premature[0], norm=norm).astype(mx.float32))
            premature_p, premature_lp = mx.exp(base_lp)[None], base_lp[None]
        else:
            premature_p, premature_lp = softmax_and_log(
                view.stack_logits(self.premature, norm=norm)
            )
            divergence = self._js_divergence(final_p, final_lp, premature_p, premature_lp)
            chosen = mx.argmax(divergence, axis=0).astype(mx.int32)
            base_lp = mx.take_along_axis(premature_lp, chosen[None, :, None], axis=0)[0]
        final_entropy = -mx.sum(final_p * final_lp, axis=-1)
        # For traces only (evaluated when read): each candidate's entropy, the final's last.
        premature_entropy = -mx.sum(premature_p * premature_lp, axis=-1)  # (K, batch)
        # Relative-top plausibility: keep tokens within relative_top of the best one.
        threshold = mx.max(final_lp, axis=-1, keepdims=True) + math.log(self.params.relative_top)
        logits = mx.where(final_lp < threshold, -mx.inf, final_lp - base_lp)
        return Decision(
            logits=logits,
            layers=mx.full((view.batch_size,), final, dtype=mx.int32),
            entropy=final_entropy,
            extras={"premature_layer": mx.array(self.premature, dtype=mx.int32)[chosen]},
            final=final_logits,
            candidate_layers=(*self.premature, final),
            candidate_entropy=mx.concatenate([premature_entropy, final_entropy[None]]).T,
        )

    @staticmethod
    def _js_divergence(final_p, final_lp, premature_p, premature_lp) -> mx.array:
        """HF's JS divergence ``(K, batch)``: KL(M||final) and KL(M||premature), vocab-mean."""
        mixture = 0.5 * (final_p[None] + premature_p)
        log_mixture = mx.log(mixture)

        def kl_to(lp):  # torch's kl_div(lp, M): M * (log M - lp), with 0 where M == 0
            return mx.mean(mx.where(mixture > 0, mixture * (log_mixture - lp), 0.0), axis=-1)

        return 0.5 * (kl_to(final_lp[None]) + kl_to(premature_lp))
