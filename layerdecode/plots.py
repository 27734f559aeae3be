"""Every matplotlib picture: the logit-lens heatmap (PNG and HTML) and the eval summary figure.

The computing modules (``layerdecode.lens``, ``layerdecode.eval.stats``) return data only;
matplotlib is imported inside each function so that importing this module stays cheap.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from layerdecode.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from layerdecode.eval.stats import Summary
    from layerdecode.lens import LensResult

__all__ = [
    "FIGURE_DPI",
    "FIGURE_WIDTH_IN",
    "figure_size",
    "lens_html",
    "plot_lens",
    "plot_summary",
    "plot_trace_entropy",
    "short_token",
]


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


FIGURE_WIDTH_IN = 11.0
FIGURE_DPI = 100


def figure_size(n_strategies: int) -> tuple[float, float]:
    """Figure size in inches for ``n_strategies`` (height grows with the histogram rows)."""
    return FIGURE_WIDTH_IN, max(4.0, 1.8 * max(n_strategies, 1) + 0.8)


def plot_summary(summary: Summary, path: str | Path, *, title: str | None = None) -> Path:
    """Save a PNG: accuracy with 95% intervals per strategy (left) and, per strategy, the
    share of tokens decoded from each layer (right). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    strategies = summary.strategies
    rows = max(len(strategies), 1)
    figure = Figure(figsize=figure_size(len(strategies)), dpi=FIGURE_DPI, layout="constrained")
    grid = figure.add_gridspec(rows, 2, width_ratios=[1, 1.6])
    if title:
        figure.suptitle(title)

    accuracy = figure.add_subplot(grid[:, 0])
    names = [s.name for s in strategies]
    values = [100 * (s.accuracy or 0.0) for s in strategies]
    errors = [
        [100 * ((s.accuracy or 0) - (s.ci_low or 0)) for s in strategies],
        [100 * ((s.ci_high or 0) - (s.accuracy or 0)) for s in strategies],
    ]
    colours = [f"C{i}" for i in range(len(strategies))]
    bars = accuracy.bar(names, values, yerr=errors, capsize=6, color=colours, alpha=0.85)
    # Zoom in on low accuracies (small models), with room for the labels above the whiskers.
    top = max([100 * (s.ci_high or 0) for s in strategies] + [1.0])
    limit = min(100.0, top * 1.3 + 2)
    for bar, s in zip(bars, strategies, strict=True):
        label = "n=0" if s.accuracy is None else f"{100 * s.accuracy:.1f}%\nn={s.n}"
        accuracy.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, 100 * (s.ci_high or 0)),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    accuracy.set_ylim(0, limit)
    accuracy.set_ylabel("accuracy (%) with 95% Wilson interval")
    accuracy.set_title("Accuracy")
    accuracy.tick_params(axis="x", labelrotation=20)

    final = max((s.final_layer for s in strategies if s.final_layer is not None), default=0)
    first = None
    for row, s in enumerate(strategies):
        axis = figure.add_subplot(grid[row, 1], sharex=first)
        first = first or axis
        total = sum(s.layer_histogram.values())
        layers = list(range(final + 1))
        shares = [100 * s.layer_histogram.get(layer, 0) / total if total else 0 for layer in layers]
        axis.bar(layers, shares, width=0.85, color=f"C{row}")
        axis.set_xlim(-0.6, final + 0.6)
        axis.set_ylim(0, 100)
        axis.set_ylabel("% of tokens")
        share = "-" if s.share_non_final is None else f"{100 * s.share_non_final:.1f}%"
        axis.set_title(f"{s.name}: {share} of tokens from a non-final layer", loc="left")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if row == len(strategies) - 1:
            axis.set_xlabel(f"layer each token was decoded from (final = {final})")
        else:
            axis.tick_params(labelbottom=False)
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def plot_trace_entropy(
    trace: pa.Table | str | Path, path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG of the mean entropy of the layers read, by depth below the final layer,
    for the tokens the strategy changed and for the others (a trace from ``--trace``: its
    directory or its table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerdecode.trace import entropy_by_depth, read_trace

    table = trace if hasattr(trace, "column") else read_trace(trace)
    means = entropy_by_depth(table)
    if not any(means.values()):
        raise ConfigError(
            "The trace has no candidate entropies to plot: write it with --trace and a "
            "strategy that reads layers below the final one (confident, dola)."
        )
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, 3.6))
    for name, style in (("unchanged", "o-"), ("changed", "s--")):
        points = sorted(means[name].items())
        if points:
            tokens = sum(n for _, (_, n) in points)
            ax.plot(
                [d for d, _ in points],
                [m for _, (m, _) in points],
                style,
                label=f"{name} tokens ({tokens} readings)",
            )
    ax.set_xlabel("depth below the final layer (0 = final)")
    ax.set_ylabel("mean entropy (nats)")
    ax.invert_xaxis()
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path
