"""The logit lens: what every decoder layer would predict at every position.

One forward pass with every layer tapped; each requested layer is decoded through the
final norm and head (exactly as the model decodes its last layer), a chunk of rows at a
time, and reduced right away to the top-1 token, its probability and the entropy, so
memory stays at one chunk of ``(rows, vocab)`` logits whatever the grid size.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    layers: Sequence[int] | None = None,
    chosen_layers: Mapping[int, int] | Sequence[int | None] | None = None,
    prompt_length: int | None = None,
) -> LensResult:
    """Decode ``layers`` (default: all) at every position of ``token_ids``.

    Args:
        model, tokenizer: as returned by :func:`layerdecode.load`.
        token_ids: the sequence to read (prompt, then any generated tokens).
        layers: 0-based decoder layers to decode; negative values count from the end.
        chosen_layers: the layer a strategy decoded each position's next token from, as
            ``{position: layer}`` or a per-position sequence (``None``/``-1``: none).
        prompt_length: prompt tokens at the start of ``token_ids`` (default: all of them).
    """
    import mlx.core as mx

    from .adapters import get_adapter
    from .errors import ConfigError
    from .taps import install_taps
    from .view import entropy_of

    ids = [int(t) for t in token_ids]
    if not ids:
        raise ConfigError("The logit lens needs at least one token.")
    adapter = get_adapter(model)
    num_layers = adapter.num_layers
    final = num_layers - 1
    if layers is None:
        rows = list(range(num_layers))
    else:
        rows = []
        for layer in layers:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise ConfigError(
                    f"Layer {layer} is out of range: the model has {num_layers} decoder layers "
                    f"(0..{final})."
                )
            rows.append(index)
        rows = sorted(set(rows))
        if not rows:
            raise ConfigError("No layers to decode: the layer range is empty.")

    taps = install_taps(adapter.layers)
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


def short_token(text: str, width: int = 6) -> str:
    """A token made printable and at most ``width`` characters (``…`` marks a cut)."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = text.replace(" ", "·") if text.strip() == "" else text.replace(" ", "␣", 1)
    if text.startswith("␣"):
        text = " " + text[1:]
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_lens(
    result: LensResult,
    path: str | Path,
    *,
    color: str = "entropy",
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Write the lens grid as a PNG heatmap.

    Layers run up the y axis, positions along x; the colour is the entropy (``color=
    "entropy"``) or the top-1 probability (``"prob"``); each cell shows its top-1 token.
    Darker cells are more confident in both colourings. The layer the strategy chose at
    each generated position is boxed (red when its top token differs from the final
    layer's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .errors import ConfigError

    if color not in ("entropy", "prob"):
        raise ConfigError(f"Unknown colour '{color}': use entropy or prob.")
    values = result.entropies if color == "entropy" else result.probs
    n_rows, n_cols = values.shape
    # Size from the grid: ~0.42in per column and ~0.24in per row keep 6-char labels legible.
    width = min(max(6.0, 1.8 + 0.42 * n_cols), 300.0)
    height = min(max(3.5, 1.9 + 0.24 * n_rows), 300.0)
    fig, ax = plt.subplots(figsize=(width, height))
    if color == "entropy":
        cmap, vmin, vmax, label = "viridis", 0.0, max(float(values.max()), 1e-6), "entropy (nats)"
    else:
        cmap, vmin, vmax, label = "viridis_r", 0.0, 1.0, "top-1 probability"
    image = ax.imshow(
        values,
        origin="lower",
        aspect="auto",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    norm = image.norm
    colormap = image.cmap
    for r in range(n_rows):
        for c in range(n_cols):
            rgba = colormap(norm(values[r, c]))
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(
                c,
                r,
                short_token(result.top_tokens[r][c]),
                ha="center",
                va="center",
                fontsize=6,
                color="black" if luminance > 0.5 else "white",
            )
    row_of = {layer: i for i, layer in enumerate(result.layers)}
    disagree = set(result.disagreements())
    for pos, layer in enumerate(result.chosen_layers.tolist()):
        if layer < 0 or layer not in row_of:
            continue
        bad = (pos, layer) in disagree
        ax.add_patch(
            Rectangle(
                (pos - 0.5, row_of[layer] - 0.5),
                1,
                1,
                fill=False,
                edgecolor="red" if bad else "white",
                linewidth=2.0 if bad else 1.4,
            )
        )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(layer) for layer in result.layers], fontsize=7)
    ax.set_ylabel("decoder layer (0-based)")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([short_token(t) for t in result.tokens], rotation=90, fontsize=6)
    ax.set_xlabel("input token at each position (cells: predicted next token)")
    for tick, pos in zip(ax.get_xticklabels(), range(n_cols), strict=True):
        if pos >= result.prompt_length:
            tick.set_color("tab:blue")
    if result.prompt_length < n_cols:
        ax.axvline(result.prompt_length - 1.5, color="black", linewidth=1.0, linestyle="--")
    cbar = fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    cbar.set_label(label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    heading = title or "logit lens"
    ax.set_title(
        f"{heading} — boxes: layer the strategy decoded from "
        "(red: its top token differs from the final layer's); blue: generated tokens",
        fontsize=8,
    )
    path = Path(path)
    try:
        with warnings.catch_warnings():  # tokens in scripts the font lacks draw as boxes
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.tight_layout()
            fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise ConfigError(f"Cannot write {path}: {e.strerror or e}.") from None
    finally:
        plt.close(fig)
    return path


def lens_html(result: LensResult, *, color: str = "entropy", title: str = "logit lens") -> str:
    """The lens grid as a self-contained HTML table (top layer first)."""
    import html

    from matplotlib import colormaps

    values = result.entropies if color == "entropy" else result.probs
    vmax = max(float(values.max()), 1e-6) if color == "entropy" else 1.0
    cmap = colormaps["viridis" if color == "entropy" else "viridis_r"]
    row_of = {layer: i for i, layer in enumerate(result.layers)}
    disagree = set(result.disagreements())
    legend = "entropy (nats)" if color == "entropy" else "top-1 probability"
    legend += "; darker = more confident"
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;font-size:12px} table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:2px 4px;font-family:monospace;white-space:pre}",
        "td.chosen{outline:2px solid #fff;outline-offset:-3px}",
        "td.differs{outline:2px solid #e00;outline-offset:-3px} th.gen{color:#1f77b4}",
        "</style></head><body>",
        f"<h3>{html.escape(title)}</h3>",
        f"<p>Colour: {legend}. Boxed: layer the strategy decoded from (red: its top token "
        "differs from the final layer's).</p>",
        "<table><tr><th>layer</th>",
    ]
    for pos, tok in enumerate(result.tokens):
        cls = " class='gen'" if pos >= result.prompt_length else ""
        lines.append(f"<th{cls}>{html.escape(short_token(tok, 10))}</th>")
    lines.append("</tr>")
    for layer in reversed(result.layers):
        r = row_of[layer]
        lines.append(f"<tr><th>{layer}</th>")
        for pos in range(result.num_positions):
            rgba = cmap(values[r, pos] / vmax)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            bg = "#{:02x}{:02x}{:02x}".format(*(int(255 * x) for x in rgba[:3]))
            fg = "#000" if lum > 0.5 else "#fff"
            cls = ""
            if result.chosen_layers[pos] == layer:
                cls = " class='differs'" if (pos, layer) in disagree else " class='chosen'"
            tip = (
                f"p={result.probs[r, pos]:.3f} H={result.entropies[r, pos]:.3f} "
                f"id={result.top_ids[r, pos]}"
            )
            text = html.escape(short_token(result.top_tokens[r][pos], 10))
            lines.append(f"<td{cls} style='background:{bg};color:{fg}' title='{tip}'>{text}</td>")
        lines.append("</tr>")
    lines.append("</table></body></html>")
    return "\n".join(lines)
