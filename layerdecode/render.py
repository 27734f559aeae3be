"""Rich rendering for the CLI: layer colours and legend, the compare table, the lens grid,
the eval summary and disagreement tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from .plots import short_token

if TYPE_CHECKING:
    from .engine import TokenEvent
    from .eval.stats import Disagreement, PartSummary, Summary
    from .generation import GenerationResult
    from .lens import LensResult

# Depth below the final layer -> colour; deeper is warmer. (low, high) inclusive, high=None: open.
DEPTH_BUCKETS: list[tuple[int, int | None, str]] = [
    (0, 0, ""),
    (1, 1, "gold1"),
    (2, 3, "orange1"),
    (4, 7, "dark_orange"),
    (8, 15, "red1"),
    (16, None, "magenta"),
]


def plain(value: Any) -> Text:
    """A table cell shown literally (model output and file names may hold ``[...]``)."""
    if isinstance(value, Text):
        return value
    return Text("" if value is None else str(value))


def records_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str = "", no_wrap=()
) -> Table:
    """One row per record, the given keys as columns; nested values shown as JSON."""
    import json

    table = Table(title=title or None, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in no_wrap)
    for row in rows:
        values = [row.get(c) for c in columns]
        table.add_row(*(plain(json.dumps(v) if isinstance(v, (dict, list)) else v) for v in values))
    return table


def key_value_table(info: dict[str, Any], *, title: str = "") -> Table:
    import json

    table = Table(show_header=False, title=title or None, title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        shown = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
        table.add_row(plain(key), plain(shown))
    return table


def layer_style(layer: int, num_layers: int) -> str:
    """The colour of a token decoded from ``layer`` (final layer: no colour)."""
    depth = num_layers - 1 - layer
    for low, high, style in DEPTH_BUCKETS:
        if depth >= low and (high is None or depth <= high):
            return style
    return ""


def layer_legend(num_layers: int, layers: Sequence[int] = ()) -> Text:
    """One line naming each colour's layer range, with the count of tokens in it."""
    final = num_layers - 1
    text = Text("layers: ", style="dim")
    first = True
    for low, high, style in DEPTH_BUCKETS:
        if low > final:
            break
        top = final - low
        bottom = 0 if high is None else max(final - high, 0)
        if low == 0:
            label = f"final ({final})"
        elif top == bottom:
            label = str(top)
        else:
            label = f"{bottom}-{top}"
        count = sum(bottom <= layer <= top for layer in layers)
        if not first:
            text.append(" · ", style="dim")
        first = False
        text.append(label, style=style or "bold")
        if layers:
            text.append(f" ×{count}", style="dim")
    return text


def part_legends(result: GenerationResult) -> list[Text]:
    """The layer legend of the output, or one for the reasoning and one for the answer."""
    by_part = result.layers_by_part()
    if len(by_part) == 1:
        return [layer_legend(result.num_layers, result.layers)]
    return [
        Text(f"{part} ", style="dim") + layer_legend(result.num_layers, layers)
        for part, layers in by_part.items()
    ]


def streamed_text(response: TokenEvent, *, show_layers: bool, separate: bool) -> Text:
    """One streamed response: its reasoning dimmed, then its answer text, each coloured by
    the token's layer if asked; ``separate`` puts a blank line before the answer."""
    colour = layer_style(response.layer, response.num_layers) if show_layers else ""
    text = Text()
    if response.reasoning:
        text.append(response.reasoning, style=f"dim {colour}".strip())
    if response.text:
        text.append("\n\n" if separate else "")
        text.append(response.text, style=colour)
    return text


def output_text(result: GenerationResult) -> Text:
    """A result's text, after its reasoning, dimmed, when it has some."""
    if result.reasoning is None:
        return plain(result.text)
    return Text.assemble((result.reasoning.strip(), "dim"), "\n\n", result.text)


def layered_text(pieces: Sequence[tuple[str, int]], num_layers: int) -> Text:
    """Text whose pieces are coloured by the layer each was decoded from."""
    text = Text()
    for piece, layer in pieces:
        text.append(piece, style=layer_style(layer, num_layers))
    return text


def summary_line(result: GenerationResult, *, strategy: str, interrupted: bool = False) -> Text:
    """Tokens, speed, share of non-final tokens, mean depth, share of changed tokens and
    extra head rows per token, as one dim line."""
    n = len(result.tokens)
    parts = [
        f"{n} token{'s' if n != 1 else ''}{_reasoning_note(result)}",
        f"{result.generation_tps:.1f} tok/s",
        f"prompt {len(result.prompt_tokens)} tok at {result.prompt_tps:.1f} tok/s",
        f"non-final {result.non_final_share:.0%}",
        f"mean depth {result.mean_depth:.2f} below final",
        f"changed {_share(result.changed_share)}",
        f"+{result.extra_head_rows:.2f} head rows/token",
        f"strategy {strategy}",
        f"peak {result.peak_memory_gb:.2f} GB",
        "interrupted" if interrupted else f"finish {result.finish_reason}",
    ]
    return Text(" · ".join(parts), style="dim")


def first_divergence(reference: Sequence[int], tokens: Sequence[int]) -> int | None:
    """Index of the first token where ``tokens`` differs from ``reference`` (None: same)."""
    for i, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def compare_table(
    prompt: str, labels: Sequence[str], results: Sequence[GenerationResult], title: str = ""
) -> Table:
    """The outputs of each strategy side by side, one column per strategy."""
    table = Table(title=title or None, show_lines=True, expand=True, title_justify="left")
    table.add_column("", style="dim", no_wrap=True)
    for label in labels:
        table.add_column(label, overflow="fold")
    reference = results[0].tokens
    rows: list[tuple[str, list[Any]]] = [
        ("output", [output_text(r) for r in results]),
        ("tokens", [f"{len(r.tokens)}{_reasoning_note(r)}" for r in results]),
        (
            "diverges at",
            ["(reference)"]
            + [_divergence_label(first_divergence(reference, r.tokens)) for r in results[1:]],
        ),
        ("tok/s", [f"{r.generation_tps:.1f}" for r in results]),
        ("non-final", [f"{r.non_final_share:.0%}" for r in results]),
        ("mean depth", [f"{r.mean_depth:.2f}" for r in results]),
        ("changed", [_share(r.changed_share) for r in results]),
        ("head rows", [f"+{r.extra_head_rows:.2f}/token" for r in results]),
    ]
    for name, cells in rows:
        table.add_row(name, *(plain(c) for c in cells))
    return table


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _reasoning_note(result: GenerationResult) -> str:
    """`` (N reasoning)``: how many of the tokens were the reasoning's, if there was any."""
    if result.reasoning is None:
        return ""
    return f" ({result.parts.count('reasoning')} reasoning)"


def _divergence_label(index: int | None) -> str:
    return "identical" if index is None else f"token {index}"


def compare_summary(
    labels: Sequence[str], per_prompt: Sequence[Sequence[GenerationResult]]
) -> Table:
    """Across prompts: mean speed, non-final share and how often each matches the first."""
    table = Table(title="summary", title_justify="left")
    for column in ("strategy", "identical", "mean diverges at", "tok/s", "non-final", "depth"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    n = len(per_prompt)
    for j, label in enumerate(labels):
        runs = [results[j] for results in per_prompt]
        divs = [first_divergence(results[0].tokens, results[j].tokens) for results in per_prompt]
        diverged = [d for d in divs if d is not None]
        table.add_row(
            label,
            f"{sum(d is None for d in divs)}/{n}",
            f"{sum(diverged) / len(diverged):.1f}" if diverged else "-",
            f"{sum(r.generation_tps for r in runs) / n:.1f}",
            f"{sum(r.non_final_share for r in runs) / n:.0%}",
            f"{sum(r.mean_depth for r in runs) / n:.2f}",
        )
    return table


def _hex(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(255 * x) for x in rgba[:3]))


SHADES = "█▓▒░ "  # most to least confident, so the grid reads without colour too


def lens_grid(result: LensResult, *, color: str = "entropy") -> Text:
    """A one-character-per-cell picture of the lens: final layer on top, positions across.

    Cells are shaded by entropy or top-1 probability (dark, dense: confident); ``●``
    marks the layer the strategy chose, ``✗`` where its top token differs from the final
    layer's.
    """
    from matplotlib import colormaps

    if color == "entropy":
        vmax = max(float(result.entropies.max()), 1e-6)
        confidence = 1.0 - result.entropies / vmax
    else:
        confidence = result.probs
    cmap = colormaps["viridis"]
    disagree = set(result.disagreements())
    width = max(len(str(layer)) for layer in result.layers)
    text = Text()
    for row in range(len(result.layers) - 1, -1, -1):
        layer = result.layers[row]
        text.append(f"{layer:>{width}} ", style="dim")
        for pos in range(result.num_positions):
            level = float(min(max(confidence[row, pos], 0.0), 1.0))
            shade = _hex(cmap(1.0 - level))
            if result.chosen_layers[pos] == layer:
                mark = "✗" if (pos, layer) in disagree else "●"
                text.append(mark, style=f"bold {'red' if mark == '✗' else 'white'} on {shade}")
            else:
                char = SHADES[min(int((1.0 - level) * len(SHADES)), len(SHADES) - 1)]
                text.append(char, style=shade)
        text.append("\n")
    text.append(" " * (width + 1))
    for pos in range(result.num_positions):
        text.append("^" if pos == result.prompt_length - 1 else " ", style="dim")
    text.append("  ^ first generated token predicted here\n", style="dim")
    text.append(
        f"{SHADES[0]} confident … {SHADES[-2]} unsure ({color}); ● chosen layer, "
        "✗ chosen layer's top token differs from the final layer's\n",
        style="dim",
    )
    return text


def lens_table(result: LensResult) -> Table:
    """Per generated position: the token, the chosen layer, and the final vs chosen top-1."""
    table = Table(title="generated tokens", title_justify="left")
    for column in ("pos", "token", "layer", "final top-1", "chosen top-1", "H chosen", "same"):
        table.add_column(column, justify="right" if column in ("pos", "layer") else "left")
    row_of = {layer: i for i, layer in enumerate(result.layers)}
    final = result.num_layers - 1
    final_row = row_of.get(final)
    for pos in range(max(result.prompt_length - 1, 0), result.num_positions - 1):
        layer = int(result.chosen_layers[pos])
        token = short_token(result.tokens[pos + 1], 12)
        final_top = int(result.final_top_ids[pos])
        final_text = (
            short_token(result.top_tokens[final_row][pos], 12)
            if final_row is not None
            else str(final_top)
        )
        if final_row is not None:
            final_text += f" {result.probs[final_row, pos]:.2f}"
        if layer in row_of:
            r = row_of[layer]
            chosen_text = f"{short_token(result.top_tokens[r][pos], 12)} {result.probs[r, pos]:.2f}"
            entropy = f"{result.entropies[r, pos]:.2f}"
            same = "yes" if int(result.top_ids[r, pos]) == final_top else Text("no", style="red")
        else:
            chosen_text, entropy, same = "(not shown)", "", ""
        table.add_row(
            str(pos),
            plain(token),
            Text(str(layer), style=layer_style(layer, result.num_layers) or "bold"),
            plain(final_text),
            plain(chosen_text),
            entropy,
            same,
        )
    return table


# -- eval summaries ---------------------------------------------------------------------------


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 07s`` or ``12.5s``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def render_summary(summary: Summary, *, title: str | None = None) -> Table:
    """A ``rich.table.Table`` with one row per strategy (print it with a rich Console)."""

    caption = (
        f"won/lost/tied, McNemar p and changed (items whose extracted answer differs) are "
        f"paired against {summary.baseline}; time: spent generating; non-final: tokens decoded "
        "below the final layer; depth: mean layers below it; cap: generations that hit the "
        "token limit, usually repetition loops; right, no cap: right answers whose generation "
        "ended before the cap."
    )
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column, justify in [
        ("strategy", "left"),
        ("n", "right"),
        ("accuracy (95% CI)", "right"),
        ("right, no cap", "right"),
        ("won/lost/tied", "right"),
        ("McNemar p", "right"),
        ("changed", "right"),
        ("tokens", "right"),
        ("tok/s", "right"),
        ("time", "right"),
        ("non-final", "right"),
        ("depth", "right"),
        ("cap", "right"),
    ]:
        table.add_column(column, justify=justify, no_wrap=column == "accuracy (95% CI)")
    comparisons = {c.strategy: c for c in summary.comparisons}
    for s in summary.strategies:
        accuracy = (
            "-"
            if s.accuracy is None
            else f"{_percent(s.accuracy)} ({_percent(s.ci_low)}-{_percent(s.ci_high)})"
        )
        c = comparisons.get(s.name)
        paired = f"{c.wins}/{c.losses}/{c.ties_correct + c.ties_wrong}" if c else "baseline"
        table.add_row(
            s.name,
            str(s.n),
            accuracy,
            str(s.correct_without_cap),
            paired,
            f"{c.p_value:.3g}" if c else "",
            f"{c.answers_differ}" if c else "",
            _number(s.mean_tokens, 0),
            _number(s.mean_tokens_per_sec),
            format_duration(s.busy_seconds),
            _percent(s.share_non_final),
            _number(s.mean_depth_below_final, 2),
            f"{s.hit_token_limit} ({_percent(s.hit_token_limit_share, 0)})",
        )
    return table


def render_parts(parts: Sequence[PartSummary]) -> Table:
    """Per strategy, the layers of the reasoning's tokens and of the answer's."""
    table = Table(title="layers in the reasoning and in the answer", title_justify="left")
    for column in ("strategy", "part", "tokens", "non-final", "depth"):
        table.add_column(column, justify="left" if column in ("strategy", "part") else "right")
    for p in parts:
        table.add_row(
            p.strategy,
            p.part,
            str(p.tokens),
            _percent(p.share_non_final),
            _number(p.mean_depth_below_final, 2),
        )
    return table


def render_disagreements(
    items: Sequence[Disagreement], strategies: Sequence[str], *, limit: int | None = None
) -> Table:
    """A ``rich.table.Table`` of items where strategies disagree: each strategy's extracted
    answer, marked right or wrong, and ``cap`` where it hit the token limit."""

    shown = list(items if limit is None else items[:limit])
    more = len(items) - len(shown)
    title = f"{len(items)} items where the strategies disagree" + (
        f" (first {len(shown)} shown)" if more else ""
    )
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("gold", justify="right")
    for name in strategies:
        table.add_column(name, justify="right")
    for item in shown:
        cells = []
        for answer in item.answers:
            mark = "right" if answer.correct else "wrong"
            cap = ", cap" if answer.hit_token_limit else ""
            value = "-" if answer.extracted is None else answer.extracted
            cells.append(f"{value} ({mark}{cap})")
        table.add_row(item.item_id, item.gold, *cells)
    return table
