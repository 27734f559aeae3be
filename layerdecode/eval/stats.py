"""Statistics over evaluation records: accuracy with Wilson intervals, paired exact McNemar
tests against the first (baseline) strategy, speed, time spent, layer use and token-cap hits,
and the items where strategies disagree; rich tables and a matplotlib figure of the same."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from layerdecode.eval.records import EvalRecord

__all__ = [
    "wilson_interval",
    "mcnemar_exact",
    "StrategySummary",
    "Comparison",
    "Summary",
    "Answer",
    "Disagreement",
    "busy_seconds",
    "format_duration",
    "complete_items",
    "summarize",
    "disagreements",
    "render_summary",
    "render_disagreements",
    "plot_summary",
]

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); n must be > 0."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(b + c, 1/2) test on the discordant pairs,
    ``min(1, 2 * P(X <= min(b, c)))``, computed exactly; 1.0 when there are none."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


@dataclass
class StrategySummary:
    """Per-strategy figures. Token shares are over all generated tokens of the strategy.

    ``correct_without_cap`` counts right answers whose generation ended on its own: a right
    number picked out of text that ran into the token cap (a loop) is often luck.
    """

    name: str
    n: int
    correct: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    mean_tokens: float | None
    mean_tokens_per_sec: float | None
    share_non_final: float | None
    mean_depth_below_final: float | None
    hit_token_limit: int
    hit_token_limit_share: float | None
    correct_without_cap: int = 0
    layer_histogram: dict[int, int] = field(default_factory=dict)
    final_layer: int | None = None
    busy_seconds: float | None = None


@dataclass
class Comparison:
    """Paired comparison of ``strategy`` with ``baseline`` on items both have answered:
    ``wins`` = strategy right and baseline wrong, ``losses`` the reverse;
    ``answers_differ`` counts items whose extracted answers differ (right or wrong) and
    ``same_output`` those whose generated text is identical."""

    strategy: str
    baseline: str
    n_paired: int
    wins: int
    losses: int
    ties_correct: int
    ties_wrong: int
    p_value: float
    answers_differ: int = 0
    same_output: int = 0


@dataclass
class Summary:
    """``busy_seconds`` is the time during which any strategy was generating (see
    :func:`busy_seconds`): the run's wall time without model loading and pauses."""

    strategies: list[StrategySummary]
    comparisons: list[Comparison]
    baseline: str | None
    n_items: int
    busy_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (histogram keys become strings)."""
        data = asdict(self)
        for entry in data["strategies"]:
            entry["layer_histogram"] = {str(k): v for k, v in entry["layer_histogram"].items()}
        return data


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def busy_seconds(records: Iterable[EvalRecord]) -> float | None:
    """Seconds covered by the union of the records' ``[started_at, finished_at]`` spans.

    Records of one batch share their start, so this is the time spent generating them,
    whatever the batch size; a run stopped and resumed later does not count the pause.
    None without records.
    """
    spans = sorted((r.started_at, r.finished_at) for r in records)
    if not spans:
        return None
    total = 0.0
    start, end = spans[0]
    for low, high in spans[1:]:
        if low > end:
            total += (end - start).total_seconds()
            start, end = low, high
        else:
            end = max(end, high)
    return total + (end - start).total_seconds()


def complete_items(
    records: Iterable[EvalRecord], strategies: Sequence[str]
) -> tuple[list[EvalRecord], list[str]]:
    """The records of ``strategies`` on items that every one of them has answered, and the
    ids of the items left out because only some of them have (in order of appearance).

    Restricting a partial results file to these items keeps the accuracies comparable.
    """
    wanted = set(strategies)
    records = [r for r in records if r.strategy in wanted]
    answered: dict[str, set[str]] = {}
    for r in records:
        answered.setdefault(r.item_id, set()).add(r.strategy)
    complete = {item for item, names in answered.items() if names >= wanted}
    left_out = [item for item in answered if item not in complete]
    return [r for r in records if r.item_id in complete], left_out


def _strategy_summary(name: str, records: list[EvalRecord]) -> StrategySummary:
    n = len(records)
    correct = sum(r.correct for r in records)
    low, high = wilson_interval(correct, n) if n else (None, None)
    layers = [layer for r in records for layer in r.layers]
    depths = [r.final_layer - layer for r in records for layer in r.layers]
    hits = sum(r.hit_token_limit for r in records)
    return StrategySummary(
        name=name,
        n=n,
        correct=correct,
        accuracy=correct / n if n else None,
        ci_low=low,
        ci_high=high,
        mean_tokens=_mean([r.n_tokens for r in records]),
        mean_tokens_per_sec=_mean([r.tokens_per_sec for r in records]),
        share_non_final=_mean([float(d > 0) for d in depths]),
        mean_depth_below_final=_mean(depths),
        hit_token_limit=hits,
        hit_token_limit_share=hits / n if n else None,
        correct_without_cap=sum(r.correct and not r.hit_token_limit for r in records),
        layer_histogram=dict(sorted(Counter(layers).items())),
        final_layer=max((r.final_layer for r in records), default=None),
        busy_seconds=busy_seconds(records),
    )


def summarize(records: Iterable[EvalRecord], strategies: Sequence[str] | None = None) -> Summary:
    """Summary of ``records`` for ``strategies`` (default: in order of first appearance).

    The first strategy is the baseline; each other one is compared with it on the items
    both have a record for. Records of strategies not listed are ignored.
    """
    records = list(records)
    names = (
        list(strategies)
        if strategies is not None
        else list(dict.fromkeys(r.strategy for r in records))
    )
    by_strategy: dict[str, dict[str, EvalRecord]] = {name: {} for name in names}
    for record in records:
        if record.strategy in by_strategy:
            by_strategy[record.strategy][record.item_id] = record
    summaries = [_strategy_summary(name, list(by_strategy[name].values())) for name in names]
    comparisons = []
    if names:
        baseline = by_strategy[names[0]]
        for name in names[1:]:
            other = by_strategy[name]
            shared = [i for i in other if i in baseline]
            pairs = [(other[i].correct, baseline[i].correct) for i in shared]
            differ = sum(other[i].extracted != baseline[i].extracted for i in shared)
            same = sum(other[i].output == baseline[i].output for i in shared)
            wins = sum(o and not b for o, b in pairs)
            losses = sum(b and not o for o, b in pairs)
            comparisons.append(
                Comparison(
                    strategy=name,
                    baseline=names[0],
                    n_paired=len(pairs),
                    wins=wins,
                    losses=losses,
                    ties_correct=sum(o and b for o, b in pairs),
                    ties_wrong=sum(not o and not b for o, b in pairs),
                    p_value=mcnemar_exact(wins, losses),
                    answers_differ=differ,
                    same_output=same,
                )
            )
    items = {record.item_id for name in names for record in by_strategy[name].values()}
    return Summary(
        strategies=summaries,
        comparisons=comparisons,
        baseline=names[0] if names else None,
        n_items=len(items),
        busy_seconds=busy_seconds(r for name in names for r in by_strategy[name].values()),
    )


@dataclass
class Answer:
    """One strategy's answer to an item."""

    strategy: str
    extracted: str | None
    correct: bool
    n_tokens: int
    hit_token_limit: bool


@dataclass
class Disagreement:
    """An item that some of the strategies got right and others wrong."""

    item_id: str
    gold: str
    answers: list[Answer]


def disagreements(records: Iterable[EvalRecord], strategies: Sequence[str]) -> list[Disagreement]:
    """Items answered by every strategy in ``strategies`` on which they are not all right or
    all wrong, in order of first appearance, with each strategy's answer in that order."""
    by_item: dict[str, dict[str, EvalRecord]] = {}
    for r in records:
        if r.strategy in strategies:
            by_item.setdefault(r.item_id, {})[r.strategy] = r
    found = []
    for item, answered in by_item.items():
        if len(answered) < len(strategies) or len({r.correct for r in answered.values()}) < 2:
            continue
        found.append(
            Disagreement(
                item_id=item,
                gold=answered[strategies[0]].gold,
                answers=[
                    Answer(
                        strategy=name,
                        extracted=answered[name].extracted,
                        correct=answered[name].correct,
                        n_tokens=answered[name].n_tokens,
                        hit_token_limit=answered[name].hit_token_limit,
                    )
                    for name in strategies
                ],
            )
        )
    return found


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


def render_summary(summary: Summary, *, title: str | None = None):
    """A ``rich.table.Table`` with one row per strategy (print it with a rich Console)."""
    from rich.table import Table

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


def render_disagreements(
    items: Sequence[Disagreement], strategies: Sequence[str], *, limit: int | None = None
):
    """A ``rich.table.Table`` of items where strategies disagree: each strategy's extracted
    answer, marked right or wrong, and ``cap`` where it hit the token limit."""
    from rich.table import Table

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
