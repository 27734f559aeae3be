"""Where a loaded mlx-lm model keeps its decoder layers, final norm and output head, found.

An intermediate layer ``i`` is decoded exactly as the model decodes its last layer:
``post(head(pre(norm(h_i))))``. Nothing here is a list of supported models:

- the decoder layers are the list mlx-lm itself uses to build a model's cache
  (``model.layers``: the inner model's list, also behind multimodal wrappers such as
  ``language_model.model.layers``);
- the final norm and the head are found by structure, on the modules from the top-level
  model down to the one that owns the layers: a norm by its role (``norm``,
  ``final_layernorm``, ``norm_f``, ``ln_f``, ...), a head as ``lm_head`` / ``output`` /
  ``embed_out``, or tied embeddings (``embed_tokens.as_linear``, quantized ones included);
- what a model does around its head that structure cannot tell (logit softcapping, logit
  scales, a vocabulary split across ranks) comes from the attributes mlx-lm gives those
  models, and from :data:`LOGIT_RULES` for the few that spell it otherwise.

Every adapter is then **checked** once per model (:func:`get_adapter`): a short probe runs
through the model with the layers tapped, and the last layer decoded through the adapter
must give the model's own logits. Where the structure offers several readings (a head and
tied embeddings, a norm or none), the first that passes is taken; when none does, the error
names the model type and the largest difference, so a wrong adapter can never decode
silently different text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModelError
from .logit_rules import (
    LOGIT_RULES,
    Rule,
    compose,
    gather,
    softcap,
    softcap_of,
)

# Attribute names, most usual first.
NORM_NAMES = (
    "norm",
    "final_layernorm",
    "final_layer_norm",
    "norm_f",
    "ln_f",
    "final_norm",
    "output_norm",
    "embedding_norm",
    "ln_out",
    "model_norm",
    "norm_out",
)
HEAD_NAMES = ("lm_head", "output", "embed_out", "head")
EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "embed_in",
    "word_embeddings",
    "tok_embeddings",
    "token_embeddings",
    "embedding",
    "embeddings",
    "embed",
)
LAYER_NAMES = ("layers", "h", "blocks")

# Probe token ids: small enough for any vocabulary.
PROBE = (1, 2, 3, 4, 5, 6)


# -- the adapter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """How to decode any decoder layer of one loaded model.

    Attributes:
        model_type: the mlx-lm ``model_type`` the adapter was made for.
        layers: the decoder layers, in order (the inner model's own list).
        norm: the final norm module, applied before the head (the identity if none).
        head: the output head (``lm_head`` or the tied embeddings' ``as_linear``).
        transform: what the model applies to the head's logits, or ``None``.
        tied_embeddings: whether the head is the (tied) input embedding matrix.
        pre_head: what the model applies to the normed hidden state before the head, or
            ``None``.
        hidden_of: turns a decoder layer's output into its hidden state for the taps
            (``None``: the output, or its first item when it is a tuple).
        layout: where the parts were found, e.g. ``{"layers": "model.layers", "norm":
            "model.norm", "head": "lm_head"}``.
        anchors: paths of the modules the parts come from (the layers' owner, the norm, the
            head or the tied embeddings), to notice when one is replaced.
    """

    model_type: str
    layers: list
    norm: Callable[[Any], Any]
    head: Callable[[Any], Any]
    transform: Callable[[Any], Any] | None
    tied_embeddings: bool
    pre_head: Callable[[Any], Any] | None = None
    layout: dict[str, str] = field(default_factory=dict, compare=False)
    hidden_of: Callable[[Any], Any] | None = None
    anchors: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def decode(self, hidden, *, norm: bool = True, transform: bool = True):
        """Logits of hidden states ``(..., hidden_size)`` through (norm,) head (, transform)."""
        h = self.norm(hidden) if norm else hidden
        if self.pre_head is not None:
            h = self.pre_head(h)
        logits = self.head(h)
        if transform and self.transform is not None:
            logits = self.transform(logits)
        return logits

    def describe(self) -> str:
        """The layout in a few words, for messages."""
        return ", ".join(f"{k} {v}" for k, v in self.layout.items())


def model_type_of(model: Any) -> str:
    model_type = getattr(model, "model_type", None)
    if model_type is None:
        model_type = getattr(getattr(model, "args", None), "model_type", None)
    return str(model_type) if model_type is not None else type(model).__module__


def _identity(x):
    return x


def _is_layer_list(value: Any) -> bool:
    import mlx.nn as nn

    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], nn.Module)


def _find_layers(model: Any) -> tuple[list, str, list[tuple[str, Any]]]:
    """The decoder layers, the path of the list that holds them, and the chain of
    (path, module) from the model to the module that owns that list."""
    modules = dict(model.named_modules())
    layers = None
    try:
        layers = getattr(model, "layers", None)
    except Exception:  # noqa: BLE001  (a property that cannot be read: search instead)
        layers = None
    owner_path, attribute = None, "layers"
    if _is_layer_list(layers):
        for path, module in modules.items():
            for key, value in module.items():
                if value is layers or (_is_layer_list(value) and value[0] is layers[0]):
                    owner_path, attribute = path, key
                    break
            if owner_path is not None:
                break
    else:
        # No ``layers`` attribute: the longest list of modules under a layer-like name.
        best = None
        for path, module in modules.items():
            for name in LAYER_NAMES:
                value = module.get(name) if isinstance(module, dict) else None
                if _is_layer_list(value) and (best is None or len(value) > len(best[0])):
                    best = (value, path, name)
        if best is not None:
            layers, owner_path, attribute = best
    if owner_path is None or not _is_layer_list(layers):
        raise UnsupportedModelError(
            f"Model type '{model_type_of(model)}' has no list of decoder layers that "
            "layerdecode can find (neither model.layers nor a list of layers in its modules)."
        )
    chain = [("", model)]
    parts = owner_path.split(".") if owner_path else []
    for i in range(len(parts)):
        path = ".".join(parts[: i + 1])
        chain.append((path, modules[path]))
    return list(layers), _join(owner_path, attribute), chain


def _child(module: Any, name: str) -> Any:
    return module.get(name) if isinstance(module, dict) else None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _norms(chain: list[tuple[str, Any]]) -> Iterator[tuple[str, str, Callable[[Any], Any]]]:
    """Candidate final norms as (label, module path, norm): on the layers' owner first, by
    role name; then none."""
    for path, module in reversed(chain):
        for name in NORM_NAMES:
            norm = _child(module, name)
            if norm is not None and callable(norm) and not _is_layer_list(norm):
                yield _join(path, name), _join(path, name), norm
    yield "none", "", _identity


def _heads(
    chain: list[tuple[str, Any]],
) -> Iterator[tuple[str, str, Callable[[Any], Any], bool]]:
    """Candidate heads as (label, module path, head, tied): a separate head near the top
    first, then tied embeddings."""
    import mlx.nn as nn

    for path, module in chain:
        for name in HEAD_NAMES:
            head = _child(module, name)
            if isinstance(head, nn.Module) and callable(head):
                yield _join(path, name), _join(path, name), head, False
    for path, module in reversed(chain):
        for name in EMBEDDING_NAMES:
            embedding = _child(module, name)
            if embedding is not None and hasattr(embedding, "as_linear"):
                where = _join(path, name)
                yield f"{where}.as_linear (tied)", where, embedding.as_linear, True


def _sharding_group(chain: list[tuple[str, Any]]) -> Any:
    for _, module in chain:
        group = getattr(module, "sharding_group", None)
        if group is not None:
            return group
    return None


def candidates(model: Any) -> Iterator[Adapter]:
    """Every adapter the model's structure allows, most likely first (unchecked)."""
    layers, layers_path, chain = _find_layers(model)
    model_type = model_type_of(model)
    modules = [m for _, m in chain]
    rule = LOGIT_RULES.get(model_type)
    found = rule(modules) if rule is not None else Rule()
    pre, post = found.pre, found.post
    cap = softcap_of(modules)
    group = _sharding_group(chain)
    # The vocabulary split across ranks is gathered first, then the model's own transform.
    transform = compose(gather(group) if group is not None else None, post)
    named = " and ".join(
        n for n in (f"{model_type} rule" if rule else "", "gathered" if group else "") if n
    )
    transforms = [(named, transform)]
    if cap is not None:
        capped = compose(transform, softcap(cap))
        transforms = [(" and ".join(filter(None, (named, f"softcap {cap:g}"))), capped)]
        transforms.append((named, transform))
    ruled = f"{model_type} rule"
    norms = [(ruled, "", found.norm)] if found.norm else list(_norms(chain))
    heads = [(ruled, "", found.head, False)] if found.head else list(_heads(chain))
    for norm_label, norm_path, norm in norms:
        for head_label, head_path, head, tied in heads:
            for label, post_head in transforms:
                layout = {"layers": layers_path, "norm": norm_label}
                layout["head"] = head_label
                if label:
                    layout["logits"] = label
                yield Adapter(
                    model_type=model_type,
                    layers=layers,
                    norm=norm,
                    head=head,
                    transform=post_head,
                    tied_embeddings=tied,
                    pre_head=pre,
                    layout=layout,
                    hidden_of=found.hidden_of,
                    anchors=tuple(p for p in (layers_path, norm_path, head_path) if p),
                )


# -- the check -------------------------------------------------------------------------------


def _tolerance(logits: Any) -> float:
    """The largest difference a correct adapter may show: rounding of the model's dtype
    (matrix products of another shape sum in another order), relative to the logits."""
    import mlx.core as mx

    eps = {mx.float32: 1e-3, mx.float16: 4e-3, mx.bfloat16: 2e-2}.get(logits.dtype, 2e-2)
    return eps * (1.0 + mx.max(mx.abs(logits.astype(mx.float32))).item())


def difference(adapter: Adapter, capture: Any, logits: Any) -> float:
    """Largest absolute difference between the last layer decoded through ``adapter`` and
    the model's own ``logits``, at the last position (``inf`` when not finite)."""
    import mlx.core as mx

    hidden = capture.outputs[-1]
    if hidden is None or hidden.ndim != 3:
        return math.inf
    try:
        ours = adapter.decode(hidden[:, -1:, :]).astype(mx.float32)
    except (ValueError, TypeError):
        return math.inf
    theirs = logits[:, -1:, :].astype(mx.float32)
    if ours.shape != theirs.shape:
        return math.inf
    diff = mx.max(mx.abs(ours - theirs)).item()
    return diff if math.isfinite(diff) else math.inf


def probe(model: Any, adapter: Adapter) -> tuple[Any, Any]:
    """Run :data:`PROBE` through the model with the adapter's layers tapped:
    (capture, logits)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from .taps import install_taps

    taps = install_taps(adapter.layers, adapter.hidden_of)
    cache = make_prompt_cache(model)
    with taps.capture() as capture:
        logits = model(mx.array([PROBE]), cache=cache)
    mx.eval(logits, [h for h in capture.outputs if h is not None])
    return capture, logits


def check(model: Any) -> Adapter:
    """The first candidate adapter that decodes the model's last layer as the model does."""
    model_type = model_type_of(model)
    found = list(candidates(model))
    if not found:
        raise UnsupportedModelError(
            f"Model type '{model_type}' has no output head that layerdecode can find "
            f"(looked for {', '.join(HEAD_NAMES)} and tied {', '.join(EMBEDDING_NAMES[:3])}...)."
        )
    try:
        capture, logits = probe(model, found[0])
    except Exception as exc:  # noqa: BLE001  (any failure of the model's own forward)
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedModelError(
            f"Model type '{model_type}' could not run a {len(PROBE)}-token probe to check "
            f"how its layers decode: {type(exc).__name__}: {reason}"
        ) from exc
    if any(h is None for h in capture.outputs):
        missing = [i for i, h in enumerate(capture.outputs) if h is None]
        raise UnsupportedModelError(
            f"Model type '{model_type}' does not run every decoder layer it lists "
            f"(layers {missing[:5]} produced nothing on a probe), so they cannot be decoded."
        )
    tolerance = _tolerance(logits)
    best: tuple[float, Adapter] | None = None
    for adapter in found:
        diff = difference(adapter, capture, logits)
        if diff <= tolerance:
            return adapter
        if best is None or diff < best[0]:
            best = (diff, adapter)
    diff, adapter = best
    shown = "not finite or of another shape" if math.isinf(diff) else f"{diff:.3g}"
    raise UnsupportedModelError(
        f"Model type '{model_type}' cannot be decoded layer by layer: its last layer decoded "
        f"through the closest layout found ({adapter.describe()}) differs from the model's own "
        f"logits by {shown} (tolerance {tolerance:.2g}). Final-layer decoding with mlx-lm "
        "still works; please report the model type."
    )


def get_adapter(model: Any, *, verify: bool = True) -> Adapter:
    """The checked adapter of a loaded mlx-lm model (found and checked once per model).

    Args:
        model: an mlx-lm model.
        verify: check the adapter against the model's own logits on a short probe (done once
            per model and remembered); ``False`` takes the most likely candidate unchecked.

    Raises:
        UnsupportedModelError: no decoder layers or head can be found, or no candidate decodes
            the last layer as the model does (one line naming the model type and the largest
            difference).
    """
    cached = model.__dict__.get("_layerdecode_adapter")
    if cached is not None and all(_resolve(model, path) is obj for path, obj in cached[1]):
        return cached[0]
    if not verify:
        return next(candidates(model))
    adapter = check(model)
    # A plain attribute, invisible to the parameter tree (as the taps are). The parts are
    # found again if a module was replaced since (quantized, sharded, reloaded).
    anchors = tuple((path, _resolve(model, path)) for path in adapter.anchors)
    object.__setattr__(model, "_layerdecode_adapter", (adapter, anchors))
    return adapter


def _resolve(model: Any, path: str) -> Any:
    node = model
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


__all__ = ["LOGIT_RULES", "Adapter", "Rule", "candidates", "check", "get_adapter", "model_type_of"]
