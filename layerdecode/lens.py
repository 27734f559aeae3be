"""The logit lens: what every decoder layer would predict at every position.

One forward pass with every layer tapped; each requested layer is decoded through the
final norm and head (exactly as the model decodes its last layer), a chunk of rows at a
time, and reduced right away to the top-1 token, its probability and the entropy, so
memory stays at one chunk of ``(rows, vocab)`` logits whatever the grid size.

This module computes; the pictures of its results live in ``layerdecode.plots`` and the
terminal views in ``layerdecode.render``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .generation import GenerationResult

__all__ = ["LayerSpec", "LensResult", "inspect_generation", "logit_lens", "parse_layer_spec"]

# Logit rows decoded per chunk: bounds the transient (rows, vocab) float32 buffer.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LensResult:
    """Top-1 prediction, its probability and the entropy per (layer, position).

    Position ``j`` holds the prediction for token ``j + 1`` made after reading tokens
    ``0..j``. Arrays are ``(len(layers), positions)``; row ``i`` is decoder layer
    ``layers[i]`` (0-based; the final layer is ``num_layers - 1``).

    Attributes:
        layers: the decoder layers of the rows, ascending.
        token_ids: the input token ids, one per position.
        tokens: the input tokens as text.
        top_ids, probs, entropies: top-1 token id, its probability, entropy in nats.
        top_tokens: the top-1 tokens as text, ``[row][position]``.
        final_top_ids: the final layer's top-1 id per position (even if not in ``layers``).
        num_layers: decoder layers of the model.
        prompt_length: number of prompt tokens (the rest of ``token_ids`` were generated).
        chosen_layers: per position, the layer a strategy decoded the next token from
            (``-1``: none, e.g. prompt positions).
    """

    layers: list[int]
    token_ids: list[int]
    tokens: list[str]
    top_ids: np.ndarray
    probs: np.ndarray
    entropies: np.ndarray
    top_tokens: list[list[str]]
    final_top_ids: np.ndarray
    num_layers: int
    prompt_length: int
    chosen_layers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_positions(self) -> int:
        return len(self.token_ids)

    def disagreements(self) -> list[tuple[int, int]]:
        """(position, chosen layer) where the chosen layer's top token differs from the final's."""
        out = []
        for pos, layer in enumerate(self.chosen_layers.tolist()):
            if layer < 0 or layer == self.num_layers - 1:
                continue
            if layer in self.layers:
                top = int(self.top_ids[self.layers.index(layer), pos])
            else:
                continue
            if top != int(self.final_top_ids[pos]):
                out.append((pos, layer))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "num_layers": self.num_layers,
            "prompt_length": self.prompt_length,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "top_ids": self.top_ids.tolist(),
            "top_tokens": self.top_tokens,
            "probs": self.probs.tolist(),
            "entropies": self.entropies.tolist(),
            "final_top_ids": self.final_top_ids.tolist(),
            "chosen_layers": self.chosen_layers.tolist(),
        }


@dataclass(frozen=True)
class LayerSpec:
    """A selection of decoder layers, parsed once and resolved against any model depth.

    ``items`` holds single layers (``int``) and half-open ranges (``(start, end)``, either
    end None); negative numbers count from the end, as in Python slices.
    """

    text: str
    items: tuple[int | tuple[int | None, int | None], ...]

    def resolve(self, num_layers: int) -> list[int]:
        """The selected layers of a model with ``num_layers`` decoder layers, ascending."""
        if not self.items:
            raise ConfigError("No layers to decode: the layer selection is empty.")
        last = num_layers - 1
        chosen: set[int] = set()
        for item in self.items:
            if isinstance(item, tuple):
                chosen.update(range(num_layers)[slice(*item)])
                continue
            index = item + num_layers if item < 0 else item
            if not 0 <= index < num_layers:
                raise ConfigError(
                    f"Layer {item} is out of range: the model has {num_layers} decoder layers "
                    f"(0..{last})."
                )
            chosen.add(index)
        if not chosen:
            raise ConfigError(
                f"Layers '{self.text}' select no layer of this model ({num_layers} layers, "
                f"0..{last})."
            )
        return sorted(chosen)


def parse_layer_spec(spec: str) -> LayerSpec:
    """``"20:30"``, ``"-8:"``, ``"5"`` or ``"0,10,20:30"`` -> a :class:`LayerSpec`.

    Ranges are half-open like Python slices; negative numbers count from the end. A spec
    that does not parse raises ``ConfigError``; range checks wait for ``resolve``.
    """
    items: list[int | tuple[int | None, int | None]] = []
    for part in spec.split(","):
        try:
            if ":" in part:
                start, _, end = part.partition(":")
                items.append((_bound(start), _bound(end)))
            else:
                items.append(int(part))
        except ValueError:
            raise ConfigError(
                f"Malformed --layers '{spec}': use START:END (half-open, like 20:30), a layer "
                "number, or a comma-separated mix; negative numbers count from the end."
            ) from None
    return LayerSpec(text=spec, items=tuple(items))


def _bound(text: str) -> int | None:
    return int(text) if text.strip() else None


def _as_spec(layers: Sequence[int] | str | LayerSpec) -> LayerSpec:
    """Every way to name layers becomes a LayerSpec, so one ``resolve`` checks them all."""
    if isinstance(layers, LayerSpec):
        return layers
    if isinstance(layers, str):
        return parse_layer_spec(layers)
    numbers = tuple(int(layer) for layer in layers)
    return LayerSpec(text=",".join(map(str, numbers)), items=numbers)


def _numpy_head(adapter: Any) -> np.ndarray | None:
    """The output head as a float32 ``(vocab, hidden)`` matrix, when numpy should apply it.

    Only on MLX's CPU device and only for a plain (unquantised, bias-free) head: there
    numpy's BLAS is an order of magnitude faster than MLX for these ``(rows, vocab)``
    products, which dominate the lens. Elsewhere the adapter decodes as usual.
    """
    import mlx.core as mx
    import mlx.nn as nn

    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    if adapter.tied_embeddings:
        owner = getattr(adapter.head, "__self__", None)
        if type(owner) is not nn.Embedding:
            return None
        weight = owner.weight
    else:
        head = adapter.head
        if type(head) is not nn.Linear or "bias" in head:
            return None
        weight = head.weight
    return np.array(weight.astype(mx.float32))


def _reduce_numpy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 id, its probability and the entropy (nats) of each row of logits."""
    logits = logits.astype(np.float32, copy=False)
    best = logits.argmax(axis=-1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=-1, keepdims=True)
    logprobs = shifted - np.log(total)
    probs = exp / total
    entropy = -np.where(probs > 0, probs * logprobs, 0.0).sum(axis=-1)
    return best, (1.0 / total[:, 0]), entropy


def _token_text(tokenizer: Any, cache: dict[int, str], token_id: int) -> str:
    text = cache.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id])
        cache[token_id] = text
    return text


def logit_lens(
    model: Any,
    tokenizer: Any,
    token_ids: Sequence[int],
    *,
    layers: Sequence[int] | str | LayerSpec | None = None,
    chosen_layers: Mapping[int, int] | Sequence[int | None] | None = None,
    prompt_length: int | None = None,
) -> LensResult:
    """Decode ``layers`` (default: all) at every position of ``token_ids``.

    Args:
        model, tokenizer: as returned by :func:`layerdecode.load`.
        token_ids: the sequence to read (prompt, then any generated tokens).
        layers: 0-based decoder layers to decode, negative values counting from the end, or
            a spec such as ``"20:30"`` or ``"0,-4:"`` (see :func:`parse_layer_spec`).
        chosen_layers: the layer a strategy decoded each position's next token from, as
            ``{position: layer}`` or a per-position sequence (``None``/``-1``: none).
        prompt_length: prompt tokens at the start of ``token_ids`` (default: all of them).
    """
    import mlx.core as mx

    from .adapters import get_adapter
    from .taps import install_taps
    from .view import entropy_of

    ids = [int(t) for t in token_ids]
    if not ids:
        raise ConfigError("The logit lens needs at least one token.")
    adapter = get_adapter(model)
    num_layers = adapter.num_layers
    final = num_layers - 1
    rows = list(range(num_layers)) if layers is None else _as_spec(layers).resolve(num_layers)

    taps = install_taps(adapter.layers, adapter.hidden_of)
    with taps.capture() as capture:
        model(mx.array(ids, dtype=mx.uint32)[None])
    decode_rows = rows if final in rows else [*rows, final]
    positions = len(ids)
    hidden = mx.stack([capture.outputs[layer][0] for layer in decode_rows])  # (L, P, H)
    hidden = hidden.reshape(len(decode_rows) * positions, -1)

    top, prob, ent = [], [], []
    weight = _numpy_head(adapter)
    if weight is not None:
        normed = np.array(adapter.norm(hidden).astype(mx.float32))
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, normed.shape[0], chunk):
            logits = normed[start : start + chunk] @ weight.T
            if adapter.transform is not None:
                logits = np.array(adapter.transform(mx.array(logits)))
            best, best_prob, entropy = _reduce_numpy(logits)
            top.append(best)
            prob.append(best_prob)
            ent.append(entropy)
    else:
        vocab = adapter.decode(hidden[:1]).shape[-1]
        chunk = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, hidden.shape[0], chunk):
            logits = adapter.decode(hidden[start : start + chunk]).astype(mx.float32)
            lse = mx.logsumexp(logits, axis=-1)
            best = mx.argmax(logits, axis=-1)
            best_prob = mx.exp(mx.max(logits, axis=-1) - lse)
            entropy = entropy_of(logits)
            mx.eval(best, best_prob, entropy)
            top.append(np.array(best))
            prob.append(np.array(best_prob))
            ent.append(np.array(entropy))
    shape = (len(decode_rows), positions)
    top_all = np.concatenate(top).reshape(shape).astype(np.int64)
    prob_all = np.concatenate(prob).reshape(shape).astype(np.float32)
    ent_all = np.concatenate(ent).reshape(shape).astype(np.float32)
    final_top = top_all[decode_rows.index(final)].copy()
    keep = slice(0, len(rows))

    chosen = np.full(positions, -1, dtype=np.int64)
    if chosen_layers is not None:
        is_map = isinstance(chosen_layers, Mapping)
        items = chosen_layers.items() if is_map else enumerate(chosen_layers)
        for pos, layer in items:
            if layer is not None and 0 <= pos < positions:
                chosen[pos] = layer + num_layers if layer < 0 else layer

    texts: dict[int, str] = {}
    top_ids = top_all[keep]
    return LensResult(
        layers=rows,
        token_ids=ids,
        tokens=[_token_text(tokenizer, texts, t) for t in ids],
        top_ids=top_ids,
        probs=prob_all[keep],
        entropies=ent_all[keep],
        top_tokens=[[_token_text(tokenizer, texts, int(t)) for t in row] for row in top_ids],
        final_top_ids=final_top,
        num_layers=num_layers,
        prompt_length=positions if prompt_length is None else int(prompt_length),
        chosen_layers=chosen,
    )


def inspect_generation(
    model: Any,
    tokenizer: Any,
    result: GenerationResult,
    *,
    layers: Sequence[int] | str | LayerSpec | None = None,
) -> LensResult:
    """The lens over a generation's prompt and output, each generated position marked with
    the layer its strategy decoded the next token from (what ``layerdecode inspect`` shows)."""
    # Position j predicts token j + 1, so the first generated token is chosen at the prompt's end.
    start = len(result.prompt_tokens) - 1
    chosen = {start + k: layer for k, layer in enumerate(result.layers)}
    return logit_lens(
        model,
        tokenizer,
        result.prompt_tokens + result.tokens,
        layers=layers,
        chosen_layers=chosen,
        prompt_length=len(result.prompt_tokens),
    )
