"""What models do around their output head that their structure does not tell.

:func:`layerdecode.adapters.get_adapter` finds a model's layers, final norm and head by
structure; this module holds the rest: settings read from a model's config (logit
soft-capping), and :data:`LOGIT_RULES`, a short table for the model types whose forward says
in code only what happens between their last layer and their logits (logit scales, a
weightless norm, AltUp or hyper-connection streams, a bare head matrix). Every adapter is
checked against the model's own logits, so a missing rule is refused, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .taps import first_output

Transform = Callable[[Any], Any]


def _setting(chain: list[Any], *names: str) -> Any:
    """The first non-None value of an attribute among ``names`` on the modules of the chain
    (top-level model first) or their ``args`` / ``config`` (and a nested ``text`` config)."""
    for module in chain:
        holders = [module]
        for key in ("args", "config"):
            holder = getattr(module, key, None)
            if holder is not None:
                holders.append(holder)
                text = getattr(holder, "text", None)
                if text is not None and not isinstance(text, (str, bool, int, float)):
                    holders.append(text)
        for holder in holders:
            for name in names:
                value = holder.get(name) if isinstance(holder, dict) else None
                if value is None:
                    try:
                        value = getattr(holder, name, None)
                    except Exception:  # noqa: BLE001  (properties of half-built wrappers)
                        value = None
                if value is not None and not callable(value):
                    return value
    return None


def model_setting(model: Any, name: str) -> Any:
    """A config value of a loaded model (``hidden_size``, ``vocab_size``...), also for
    multimodal wrappers whose text settings sit in ``text_config``; ``None`` if absent."""
    chain = [model]
    for key in ("language_model", "model"):
        inner = model.get(key) if isinstance(model, dict) else None
        if inner is not None:
            chain.append(inner)
    value = _setting(chain, name)
    if value is None:
        text = getattr(getattr(model, "args", None), "text_config", None)
        value = text.get(name) if isinstance(text, dict) else getattr(text, name, None)
    return value


def _scale(factor: float) -> Transform:
    def transform(logits):
        return logits * factor

    return transform


def softcap(cap: float) -> Transform:
    import mlx.core as mx

    def transform(logits):
        return mx.tanh(logits / cap) * cap

    return transform


@dataclass(frozen=True)
class Rule:
    """What a model does around its head that its structure does not tell.

    Attributes:
        pre: applied to the normed hidden state before the head.
        post: applied to the head's logits.
        norm: the final norm, when it is a function rather than a module.
        hidden_of: what a decoder layer's output is turned into before the norm, when it is
            not the layer's (first) returned array.
        head: the output head, when it is not a module (a bare weight matrix).
    """

    pre: Transform | None = None
    post: Transform | None = None
    norm: Transform | None = None
    hidden_of: Callable[[Any], Any] | None = None
    head: Transform | None = None


def _cohere(chain: list[Any]) -> Rule:
    return Rule(post=_scale(float(_setting(chain, "logit_scale"))))


def _granite(chain: list[Any]) -> Rule:
    return Rule(post=_scale(1.0 / float(_setting(chain, "logits_scaling"))))


def _minicpm(chain: list[Any]) -> Rule:
    # The hidden state is divided by hidden_size / dim_model_base before the head.
    ratio = float(_setting(chain, "hidden_size")) / float(_setting(chain, "dim_model_base"))
    return Rule(pre=_scale(1.0 / ratio))


def _falcon_h1(chain: list[Any]) -> Rule:
    # Only the tied head is scaled; an untied one has the multiplier folded into its weights.
    if not _setting(chain, "tie_word_embeddings"):
        return Rule()
    multiplier = float(_setting(chain, "lm_head_multiplier"))
    return Rule(post=_scale(multiplier / float(_setting(chain, "embedding_multiplier"))))


def _output_multiplier(chain: list[Any]) -> Rule:
    import mlx.core as mx

    factor = float(_setting(chain, "output_multiplier"))

    def transform(logits):
        return logits.astype(mx.float32) * factor

    return Rule(post=transform)


def _nanochat(chain: list[Any]) -> Rule:
    # A parameter-free RMS norm before the head and a fixed softcap of 15 after it.
    import mlx.core as mx

    def norm(h):
        return mx.fast.rms_norm(h, None, 1e-5)

    return Rule(post=softcap(15.0), norm=norm)


def _hyper_connections(chain: list[Any]) -> Rule:
    # Layers return (streams (B, L, copies, D), mix (B, L, copies)); after the last layer the
    # model collapses the streams with the mix, in float32, before its norm.
    import mlx.core as mx

    def collapse(out):
        streams, mix = out[0], out[1]
        merged = mx.sum(mix[..., None] * streams.astype(mx.float32), axis=2)
        return merged.astype(streams.dtype)

    return Rule(hidden_of=collapse)


def _altup(chain: list[Any]) -> Rule:
    # Layers carry several AltUp streams (streams, B, L, D); after the last layer the model
    # maps streams 1.. back with its un-embedding projections, matches their magnitude to
    # stream 0 and averages them, before its norm.
    import mlx.core as mx

    owner = chain[-1]

    def merge(out):
        h = first_output(out)
        if h.ndim != 4:
            return h
        target = mx.mean(h[0] ** 2, axis=-1, keepdims=True) ** 0.5
        rest = mx.stack([p(h[i + 1]) for i, p in enumerate(owner.altup_unembed_projections)])
        size = mx.mean(rest**2, axis=-1, keepdims=True) ** 0.5
        rest = rest * (target / mx.maximum(size, mx.finfo(h.dtype).min))
        return mx.mean(mx.concatenate([h[:1], rest]), axis=0)

    return Rule(hidden_of=merge)


def _talkie(chain: list[Any]) -> Rule:
    # Weightless RMS norm; the head is a bare matrix, scaled by a learned gain.
    import mlx.core as mx

    model = chain[0]
    eps = float(_setting(chain, "rms_norm_eps"))

    def norm(h):
        return mx.fast.rms_norm(h, None, eps)

    def head(h):
        return h @ model["lm_head"].T

    return Rule(norm=norm, head=head, post=model.lm_head_gain)


LOGIT_RULES: dict[str, Callable[[list[Any]], Rule]] = {
    "deepseek_v41": _hyper_connections,
    "gemma3n": _altup,
    "talkie": _talkie,
    "cohere": _cohere,
    "cohere2": _cohere,
    "granite": _granite,
    "granitemoe": _granite,
    "granitemoehybrid": _granite,
    "minicpm": _minicpm,
    "minicpm3": _minicpm,
    "falcon_h1": _falcon_h1,
    "muse_glimmer": _output_multiplier,
    "muse_spark": _output_multiplier,
    "nanochat": _nanochat,
}
"""model_type -> ``rule(chain) -> Rule``: what the model does around its head besides
softcapping (found by attribute), for the types whose forward says so in code only.
``chain`` is the list of modules from the top-level model to the one owning the layers."""


def softcap_of(chain: list[Any]) -> float | None:
    cap = _setting(chain, "final_logit_softcapping", "logit_softcapping", "logits_soft_cap")
    return float(cap) if cap else None


def gather(group: Any) -> Transform:
    """The logits of a head split over the vocabulary across ``group``, gathered as mlx-lm's
    models gather them."""
    from functools import partial

    from mlx_lm.models.base import gather_last_axis

    return partial(gather_last_axis, group=group)


def compose(*steps: Transform | None) -> Transform | None:
    steps = tuple(s for s in steps if s is not None)
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def transform(x):
        for step in steps:
            x = step(x)
        return x

    return transform
