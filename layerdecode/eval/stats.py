"""Statistics over evaluation records: accuracy with Wilson intervals, paired exact McNemar
tests against the first (baseline) strategy, speed, time spent, layer use and token-cap hits,
and the items where strategies disagree.

Data only: the tables are in ``layerdecode.render``, the figure in ``layerdecode.plots``."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from layerdecode.eval.records import EvalRecord
from layerdecode.layerstats import TokenStats, TokenTally
from layerdecode.reasoning import layers_by_part

__all__ = [
    "wilson_interval",
    "mcnemar_exact",
    "StrategySummary",
    "Comparison",
    "Summary",
    "Answer",
    "Disagreement",
    "PartSummary",
    "busy_seconds",
    "complete_items",
    "summarize",
    "disagreements",
    "part_summaries",
    "token_tally",
    "by_difficulty",
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
    depth_histogram: dict[int, int] = field(default_factory=dict)
    tokens_changed: int | None = None
    share_changed: float | None = None
    extra_head_rows_per_token: float | None = None

    def token_stats(self) -> TokenStats:
        """The per-token figures (shares over the strategy's tokens)."""
        return TokenStats(
            tokens=sum(self.depth_histogram.values()),
            non_final_share=self.share_non_final,
            mean_depth=self.mean_depth_below_final,
            depth_histogram=dict(self.depth_histogram),
            changed=self.tokens_changed,
            changed_share=self.share_changed,
            extra_head_rows=self.extra_head_rows_per_token,
        )


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
            entry["depth_histogram"] = {str(k): v for k, v in entry["depth_histogram"].items()}
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
    tokens = token_tally(records).stats()
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
        depth_histogram=tokens.depth_histogram,
        tokens_changed=tokens.changed,
        share_changed=tokens.changed_share,
        extra_head_rows_per_token=tokens.extra_head_rows,
    )


def token_tally(records: Iterable[EvalRecord]) -> TokenTally:
    """The records' tokens added up: depths, changed tokens and head rows where known."""
    tally = TokenTally()
    for r in records:
        tally.add([r.final_layer - layer for layer in r.layers], r.n_changed, r.head_rows)
    return tally


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
class PartSummary:
    """Layer use in one part of a strategy's outputs: the reasoning or the answer."""

    strategy: str
    part: str
    tokens: int
    share_non_final: float | None
    mean_depth_below_final: float | None


def part_summaries(records: Iterable[EvalRecord], strategies: Sequence[str]) -> list[PartSummary]:
    """Per strategy, the layer use of its reasoning tokens and of its answer tokens; empty
    when no record of these strategies had reasoning."""
    records = [r for r in records if r.strategy in strategies]
    if not any(r.reasoning is not None for r in records):
        return []
    found = []
    for name in strategies:
        # Depths below each record's own final layer, so that mixed models add up.
        depths: dict[str, list[int]] = {}
        for r in records:
            if r.strategy != name:
                continue
            for part, layers in layers_by_part(r.layers, r.parts).items():
                depths.setdefault(part, []).extend(r.final_layer - layer for layer in layers)
        for part in ("reasoning", "answer"):
            below = depths.get(part, [])
            share = _mean([float(d > 0) for d in below])
            found.append(PartSummary(name, part, len(below), share, _mean(below)))
    return found


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


def _level_key(level: str) -> tuple:
    """Natural order: ``Level 2`` before ``Level 10``, numbers by value, words after."""
    pieces = re.split(r"(\d+(?:\.\d+)?)", level)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p.lower()) for i, p in enumerate(pieces))


def by_difficulty(records: Iterable[EvalRecord], strategies: Sequence[str]) -> dict[str, Summary]:
    """One :func:`summarize` per difficulty level (accuracy, and the paired test against
    the first strategy within the level), in natural order of the levels; empty when no
    record has a ``difficulty``."""
    levels: dict[str, list[EvalRecord]] = {}
    for r in records:
        if r.difficulty is not None and r.strategy in strategies:
            levels.setdefault(r.difficulty, []).append(r)
    return {level: summarize(levels[level], strategies) for level in sorted(levels, key=_level_key)}
