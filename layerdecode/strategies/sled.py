"""``sled``: SLED, Self Logits Evolution Decoding (Zhang et al., NeurIPS 2024).

The final layer's top-``evolution_scale`` tokens are candidates. Every premature layer
votes for the candidates its logits move towards: the cosine between the layer's
divergence from the final logits and the gradient that would make each candidate the
answer, clipped at 0 and squared. The votes, weighted per layer, form a target; the final
logits take one step of size ``evolution_rate`` towards it, and every token outside the
candidates gets ``evolution_lower_bound``.

Semantics follow the official implementation's greedy decoding (one evolution step; layers
read as HF's ``output_hidden_states`` numbering, premature layers through the head without
the final norm, the mature layer being the model's own output), per row of a batch.
"""

from __future__ import annotations

from typing import Literal

import mlx.core as mx
from pydantic import Field

from ..fastmath import softmax_and_log
from ..strategy import Decision, ModelFacts
from ..view import LayerView
from .premature import PrematureLayersStrategy, PrematureParams, checked_hf_layers

_EPS = 1e-8  # torch's cosine_similarity guard against a zero-length vector


class SledParams(PrematureParams):
    layers: Literal["all"] | list[int] = Field(
        "all",
        description="Candidate premature layers in HF's numbering (0 = embedding output, i = "
        "output of decoder layer i counting from 1); 'all' is every one below the final "
        "layer, as the official code uses by default.",
    )
    evolution_rate: float = Field(
        2.0,
        ge=0.0,
        description="Step size of the logits evolution; 0 leaves the final logits as they are.",
    )
    evolution_scale: int = Field(
        10, ge=1, description="Number of top final-layer tokens that are candidates (top-k)."
    )
    evolution_lower_bound: float = Field(
        -1000.0, description="Logit given to every token outside the candidates."
    )
    premature_norm: bool = Field(
        False,
        description="Decode premature layers through the final norm (the official code "
        "applies the head to the raw hidden state).",
    )


class SledStrategy(PrematureLayersStrategy):
    name = "sled"
    description = "SLED: evolve the final logits towards what the earlier layers point at."
    Params = SledParams

    def hf_layers(self, model: ModelFacts) -> list[int]:
        spec = self.params.layers
        if spec == "all":
            return list(range(model.num_layers))
        return checked_hf_layers("sled", spec, model.num_layers)

    def select(self, view: LayerView) -> Decision:
        p = self.params
        final = view.logits(view.final_layer).astype(mx.float32)  # (B, V)
        premature = view.stack_logits(self.premature, norm=p.premature_norm)
        premature = premature.astype(mx.float32)  # (L, B, V)
        k = min(p.evolution_scale, final.shape[-1])
        final_p = softmax_and_log(final)[0]
        top = mx.argpartition(-final, kth=k - 1, axis=-1)[:, :k]  # (B, k) candidates

        # Cosine between each layer's divergence d = premature - final and the gradient
        # g_j = softmax(premature) - onehot(candidate j), without building g_j:
        # g_j . d = s . d - d[j] and |g_j|^2 = |s|^2 - 2 s[j] + 1.
        divergence = premature - final[None]
        soft = softmax_and_log(premature)[0]
        cols = mx.broadcast_to(top[None], (premature.shape[0], *top.shape))
        d_top = mx.take_along_axis(divergence, cols, axis=-1)  # (L, B, k)
        s_top = mx.take_along_axis(soft, cols, axis=-1)
        dot = mx.sum(soft * divergence, axis=-1, keepdims=True) - d_top
        g_norm = mx.sqrt(mx.maximum(mx.sum(soft * soft, axis=-1, keepdims=True) - 2 * s_top + 1, 0))
        d_norm = mx.sqrt(mx.sum(divergence * divergence, axis=-1, keepdims=True))
        cosine = dot / (mx.maximum(g_norm, _EPS) * mx.maximum(d_norm, _EPS))

        votes = mx.square(mx.maximum(cosine, 0.0))  # (L, B, k)
        per_layer = mx.sum(votes, axis=-1, keepdims=True)  # (L, B, 1)
        votes = mx.where(per_layer > 0, votes / mx.where(per_layer > 0, per_layer, 1), votes)
        total = mx.sum(per_layer, axis=0, keepdims=True)
        weights = mx.where(total > 0, per_layer / mx.where(total > 0, total, 1), per_layer)
        delta = -mx.sum(weights * votes, axis=0)  # (B, k): the target's pull on each candidate

        # One evolution step (the official greedy decoding uses one), on the candidates only:
        # every other token is set to the lower bound afterwards anyway.
        final_top = mx.take_along_axis(final, top, axis=-1)
        evolved = final_top - p.evolution_rate * (mx.take_along_axis(final_p, top, axis=-1) + delta)
        logits = mx.full(final.shape, p.evolution_lower_bound, dtype=mx.float32)
        logits = mx.put_along_axis(logits, top, evolved, axis=-1)
        return Decision(
            logits=logits,
            layers=mx.full((view.batch_size,), view.final_layer, dtype=mx.int32),
            entropy=view.entropy(view.final_layer),
            extras={"evolved_tokens": mx.sum(delta < 0, axis=-1).astype(mx.int32)},
        )
