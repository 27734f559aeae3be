"""Rich rendering of the per-token figures beside the published ones: non-final and changed
shares, extra vocabulary-head rows per token, the histogram of depths below the final layer;
and the accuracy per difficulty level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from .layerstats import PUBLISHED, TokenStats

if TYPE_CHECKING:
    from .eval.stats import Summary


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _extra(value: float | None) -> str:
    return "-" if value is None else f"+{value:.3f}"


def figures_line(stats: TokenStats) -> Text:
    """``non-final 5.5% · changed 2.0% · +0.104 head rows/token`` (dim)."""
    return Text(
        f"non-final {_percent(stats.non_final_share)} · changed "
        f"{_percent(stats.changed_share, 2)} · {_extra(stats.extra_head_rows)} head rows/token",
        style="dim",
    )


def published_line(strategy: str) -> Text | None:
    """The figures a paper publishes for ``strategy`` (a registered name), if any."""
    paper = PUBLISHED.get(strategy)
    if paper is None:
        return None
    return Text(
        f"published ({paper.source}), {strategy}: non-final {_percent(paper.non_final_share)} · "
        f"changed {_percent(paper.changed_share, 2)} · {_extra(paper.extra_head_rows)} "
        "head rows/token",
        style="dim italic",
    )


def depth_line(stats: TokenStats) -> Text:
    """``depth below final: 0 ×120 (94.5%) · 1 ×5 (3.9%)``: the histogram as one line."""
    text = Text("depth below final: ", style="dim")
    for i, (depth, count) in enumerate(stats.depth_histogram.items()):
        if i:
            text.append(" · ", style="dim")
        text.append(f"{depth}", style="bold")
        text.append(f" ×{count} ({_percent(count / stats.tokens)})", style="dim")
    return text


def token_lines(stats: TokenStats, strategy: str) -> list[Text]:
    """One generation's figures and depth histogram, and the published figures beside."""
    lines = [figures_line(stats), depth_line(stats)]
    published = published_line(strategy)
    if published is not None:
        lines.append(published)
    return lines


def token_table(rows: Sequence[tuple[str, TokenStats]], kinds: Mapping[str, str]) -> Table:
    """Per strategy: tokens, non-final and changed shares, extra head rows per token; a row
    with the published figures follows each strategy that has some (``kinds`` maps a
    strategy's name in the results to its registered strategy)."""
    sources = sorted({PUBLISHED[k].source for k in kinds.values() if k in PUBLISHED})
    caption = (
        "non-final: tokens decoded below the final layer; tokens changed: those that differ from "
        "the final layer's; head rows: vocabulary-head rows per token beyond the final "
        "layer's."
    )
    if sources:
        caption += f" Published figures: {'; '.join(sources)}."
    table = Table(
        title="per-token figures", title_justify="left", caption=caption, caption_justify="left"
    )
    for column in ("strategy", "tokens", "non-final", "tokens changed", "extra head rows/token"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    shown: set[str] = set()
    for name, stats in rows:
        changed = _percent(stats.changed_share, 2)
        if stats.changed is not None:
            changed = f"{stats.changed} ({changed})"
        table.add_row(
            name,
            str(stats.tokens),
            _percent(stats.non_final_share),
            changed,
            _extra(stats.extra_head_rows),
        )
        kind = kinds.get(name, "")
        paper = PUBLISHED.get(kind)
        if paper is not None and kind not in shown:
            shown.add(kind)
            table.add_row(
                Text(f"{kind}, published", style="dim italic"),
                "",
                Text(_percent(paper.non_final_share), style="dim italic"),
                Text(_percent(paper.changed_share, 2), style="dim italic"),
                Text(_extra(paper.extra_head_rows), style="dim italic"),
            )
    return table


def depth_table(rows: Sequence[tuple[str, TokenStats]]) -> Table:
    """The histogram of depths below the final layer: one row per depth, one column per
    strategy, each cell the tokens at that depth and their share."""
    table = Table(title="tokens per depth below final", title_justify="left")
    table.add_column("depth", justify="right")
    for name, _ in rows:
        table.add_column(name, justify="right")
    depths = sorted({d for _, stats in rows for d in stats.depth_histogram})
    for depth in depths:
        cells = []
        for _, stats in rows:
            count = stats.depth_histogram.get(depth, 0)
            cells.append(f"{count} ({_percent(count / stats.tokens if stats.tokens else None)})")
        table.add_row("0 (final)" if depth == 0 else str(depth), *cells)
    return table


def difficulty_table(levels: Mapping[str, Summary]) -> Table:
    """Accuracy per difficulty level, each strategy paired against the first within it."""
    table = Table(
        title="accuracy by difficulty",
        title_justify="left",
        caption="won/lost/tied and McNemar p: paired against the baseline within the level.",
        caption_justify="left",
    )
    for column in ("level", "strategy", "n", "accuracy (95% CI)", "won/lost/tied", "McNemar p"):
        table.add_column(column, justify="left" if column in ("level", "strategy") else "right")
    for level, summary in levels.items():
        comparisons = {c.strategy: c for c in summary.comparisons}
        for i, s in enumerate(summary.strategies):
            accuracy = "-"
            if s.accuracy is not None:
                accuracy = f"{_percent(s.accuracy)} ({_percent(s.ci_low)}-{_percent(s.ci_high)})"
            c = comparisons.get(s.name)
            paired = f"{c.wins}/{c.losses}/{c.ties_correct + c.ties_wrong}" if c else "baseline"
            table.add_row(
                level if i == 0 else "",
                s.name,
                str(s.n),
                accuracy,
                paired,
                f"{c.p_value:.3g}" if c else "",
            )
    return table
