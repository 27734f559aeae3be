"""Per-architecture facts: where the decoder layers, final norm and output head live.

An intermediate layer ``i`` is decoded exactly as the model decodes its last layer:
``transform(head(final_norm(h_i)))``. The table below names the architectures whose
layout has been checked (tests compare the adapter's decoding of the last layer with
the model's own logits for a tiny random model of each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModelError

# model_type -> logit post-processing applied by the model after its head, as a factory
# taking the model and returning a function of the logits (None: no post-processing).
_TransformFactory = Callable[[Any], Callable[[Any], Any] | None]


def _no_transform(model: Any) -> None:
    return None


def _softcap(model: Any) -> Callable[[Any], Any] | None:
    cap = getattr(model, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(model, "args", None), "final_logit_softcapping", None)
    if not cap:
        return None

    import mlx.core as mx

    def transform(logits):
        return mx.tanh(logits / cap) * cap

    return transform


def _cohere_scale(model: Any) -> Callable[[Any], Any]:
    scale = model.model.args.logit_scale

    def transform(logits):
        return logits * scale

    return transform


def _granite_scale(model: Any) -> Callable[[Any], Any]:
    scaling = model.logits_scaling

    def transform(logits):
        return logits / scaling

    return transform


# The architectures whose layout (``model.model.layers``, ``model.model.norm``, tied
# ``embed_tokens`` or ``lm_head``) has been checked, and their logit post-processing.
ARCHITECTURES: dict[str, _TransformFactory] = {
    "llama": _no_transform,
    "mistral": _no_transform,
    "smollm3": _no_transform,
    "qwen2": _no_transform,
    "qwen2_moe": _no_transform,
    "qwen3": _no_transform,
    "qwen3_moe": _no_transform,
    "mixtral": _no_transform,
    "phi3": _no_transform,
    "olmo2": _no_transform,
    "starcoder2": _no_transform,
    "gemma": _no_transform,
    "gemma2": _softcap,
    "gemma3_text": _softcap,
    "cohere": _cohere_scale,
    "granite": _granite_scale,
}


@dataclass(frozen=True)
class Adapter:
    """How to decode any decoder layer of one loaded model.

    Attributes:
        model_type: the mlx-lm ``model_type`` the adapter was made for.
        layers: the decoder layers, in order (the inner model's own list).
        norm: the final norm module, applied before the head.
        head: the output head (``lm_head`` or the tied ``embed_tokens.as_linear``).
        transform: logit post-processing the model applies after its head, or ``None``.
        tied_embeddings: whether the head is the (tied) input embedding matrix.
    """

    model_type: str
    layers: list
    norm: Callable[[Any], Any]
    head: Callable[[Any], Any]
    transform: Callable[[Any], Any] | None
    tied_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def decode(self, hidden, *, norm: bool = True, transform: bool = True):
        """Logits of hidden states ``(..., hidden_size)`` through (norm,) head (, transform)."""
        h = self.norm(hidden) if norm else hidden
        logits = self.head(h)
        if transform and self.transform is not None:
            logits = self.transform(logits)
        return logits


def model_type_of(model: Any) -> str:
    model_type = getattr(model, "model_type", None)
    if model_type is None:
        model_type = getattr(getattr(model, "args", None), "model_type", None)
    return str(model_type) if model_type is not None else type(model).__module__


def get_adapter(model: Any) -> Adapter:
    """The adapter for a loaded mlx-lm model, or an error naming what is missing."""
    model_type = model_type_of(model)
    factory = ARCHITECTURES.get(model_type)
    if factory is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"Model type '{model_type}' is not supported by layerdecode: no adapter says where "
            f"its final norm and output head are. Supported: {supported}."
        )
    inner = getattr(model, "model", None)
    missing = [name for name in ("layers", "norm", "embed_tokens") if not hasattr(inner, name)]
    if inner is None or missing:
        what = "model.model" if inner is None else ", ".join(f"model.model.{m}" for m in missing)
        raise UnsupportedModelError(
            f"Model type '{model_type}' does not have the expected layout: missing {what}."
        )
    # A separate head exists exactly when the model did not tie it to the embeddings
    # (mlx-lm removes or never creates ``lm_head`` for tied models).
    tied = "lm_head" not in model
    head = inner.embed_tokens.as_linear if tied else model.lm_head
    return Adapter(
        model_type=model_type,
        layers=inner.layers,
        norm=inner.norm,
        head=head,
        transform=factory(model),
        tied_embeddings=tied,
    )
