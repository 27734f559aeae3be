"""Statistics: Wilson intervals, exact McNemar, the summary, its table and its plot.

The table renderers live in ``layerdecode.render`` and the figure in ``layerdecode.plots``;
they are tested here on the same records."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from layerdecode.eval.records import EvalRecord
from layerdecode.eval.stats import (
    busy_seconds,
    complete_items,
    disagreements,
    mcnemar_exact,
    summarize,
    wilson_interval,
)
from layerdecode.plots import figure_size, plot_summary
from layerdecode.render import format_duration, render_disagreements, render_summary

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def record(
    item: int,
    strategy: str,
    correct: bool,
    layers=(3, 3),
    hit=False,
    tps=10.0,
    span=(0.0, 0.0),
    output="The answer is 1.",
):
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return EvalRecord(
        item_id=str(item),
        strategy=strategy,
        prompt="Q",
        output=output,
        extracted="1" if correct else "2",
        gold="1",
        correct=correct,
        n_tokens=len(layers),
        tokens_per_sec=tps,
        hit_token_limit=hit,
        layers=list(layers),
        final_layer=3,
        started_at=stamp + timedelta(seconds=span[0]),
        finished_at=stamp + timedelta(seconds=span[1]),
    )


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10, z = 1.96: centre 0.71675, half-width 0.22658.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94333, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-4)
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_mcnemar_exact_hand_computed():
    assert mcnemar_exact(1, 8) == pytest.approx(2 * (1 + 9) / 2**9)  # 0.0390625
    assert mcnemar_exact(8, 1) == 0.0390625
    assert mcnemar_exact(0, 5) == 0.0625
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def _records():
    rows = []
    # 10 items; baseline right on 0-4, "dola" right on 0-3 and 5-9 (1 loss, 5 wins).
    for i in range(10):
        rows.append(record(i, "final", i < 5, layers=(3, 3, 3), tps=20.0))
        rows.append(record(i, "dola", i != 4, layers=(3, 1, 2, 3), hit=i == 9, tps=10.0))
    rows.append(record(10, "dola", True))  # unpaired: counts for accuracy only
    rows.append(record(0, "ignored", True))
    return rows


def test_summarize():
    summary = summarize(_records(), ["final", "dola"])
    final, dola = summary.strategies
    assert (final.n, final.correct, final.accuracy) == (10, 5, 0.5)
    assert (dola.n, dola.correct) == (11, 10)
    assert final.share_non_final == 0.0 and final.layer_histogram == {3: 30}
    assert dola.layer_histogram == {1: 10, 2: 10, 3: 22}
    assert dola.share_non_final == pytest.approx(20 / 42)
    assert dola.mean_depth_below_final == pytest.approx((10 * 2 + 10 * 1) / 42)
    assert dola.hit_token_limit == 1 and dola.hit_token_limit_share == pytest.approx(1 / 11)
    # dola's right answer on item 9 ran into the cap: it does not count as right without it.
    assert (final.correct_without_cap, dola.correct_without_cap) == (5, 9)
    assert final.mean_tokens_per_sec == 20.0
    (comparison,) = summary.comparisons
    assert (comparison.n_paired, comparison.wins, comparison.losses) == (10, 5, 1)
    assert (comparison.ties_correct, comparison.ties_wrong) == (4, 0)
    assert comparison.p_value == pytest.approx(mcnemar_exact(5, 1))
    assert summary.baseline == "final" and summary.n_items == 11
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["strategies"][1]["layer_histogram"] == {"1": 10, "2": 10, "3": 22}
    # Default order: first appearance; a strategy without records has n = 0.
    assert [s.name for s in summarize(_records()).strategies] == ["final", "dola", "ignored"]
    empty = summarize([], ["final"]).strategies[0]
    assert empty.n == 0 and empty.accuracy is None


def test_render_summary():
    console = Console(width=200, record=True)
    console.print(render_summary(summarize(_records(), ["final", "dola"])))
    text = console.export_text()
    assert "50.0% (23.7%-76.3%)" in text
    assert "5/1/4" in text and "baseline" in text


def test_plot_writes_png(tmp_path):
    summary = summarize(_records(), ["final", "dola"])
    path = plot_summary(summary, tmp_path / "summary.png", title="gsm8k")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    expected = figure_size(2)
    assert (width, height) == (round(expected[0] * 100), round(expected[1] * 100))


def test_comparison_counts_changed_answers_and_identical_outputs():
    rows = [
        record(0, "final", True),
        record(0, "other", True),  # same answer, same text
        record(1, "final", False),
        record(1, "other", False, output="Different words, same wrong answer 2."),
        record(2, "final", True),
        record(2, "other", False),  # answer changed
        record(3, "final", False, output="x"),
        record(3, "other", False, output="x"),
    ]
    rows[5] = record(2, "other", False, output="The answer is 2.")
    (comparison,) = summarize(rows, ["final", "other"]).comparisons
    assert (comparison.wins, comparison.losses) == (0, 1)
    assert comparison.answers_differ == 1
    assert comparison.same_output == 2


def test_busy_seconds_is_the_union_of_spans():
    rows = [
        record(0, "final", True, span=(0, 10)),
        record(1, "final", True, span=(0, 4)),  # same batch, finished earlier
        record(2, "final", True, span=(8, 12)),  # overlaps the first
        record(3, "final", True, span=(100, 105)),  # after a pause: the pause is not counted
    ]
    assert busy_seconds(rows) == pytest.approx(12 + 5)
    assert busy_seconds(rows[::-1]) == pytest.approx(17)
    assert busy_seconds([]) is None
    summary = summarize(rows + [record(0, "dola", True, span=(11, 30))], ["final", "dola"])
    assert summary.strategies[0].busy_seconds == pytest.approx(17)
    assert summary.strategies[1].busy_seconds == pytest.approx(19)
    assert summary.busy_seconds == pytest.approx(30 + 5)


def test_format_duration():
    assert format_duration(None) == "-"
    assert format_duration(12.46) == "12.5s"
    assert format_duration(187) == "3m 07s"
    assert format_duration(3725) == "1h 02m"


def test_complete_items_keeps_items_every_strategy_answered():
    rows = _records()
    kept, left_out = complete_items(rows, ["final", "dola"])
    assert left_out == ["10"]  # only dola answered item 10
    assert {r.item_id for r in kept} == {str(i) for i in range(10)}
    assert {r.strategy for r in kept} == {"final", "dola"}  # "ignored" is not asked for
    summary = summarize(kept, ["final", "dola"])
    assert [s.n for s in summary.strategies] == [10, 10]
    kept, left_out = complete_items(rows, ["final", "dola", "ignored"])
    assert [r.item_id for r in kept] == ["0", "0", "0"] and len(left_out) == 10


def test_disagreements_lists_items_with_mixed_verdicts():
    found = disagreements(_records(), ["final", "dola"])
    # final right on 0-4, dola right on all but 4: they disagree on 4..9; item 10 is unpaired.
    assert [d.item_id for d in found] == ["4", "5", "6", "7", "8", "9"]
    first = found[0]
    assert first.gold == "1"
    assert [(a.strategy, a.extracted, a.correct) for a in first.answers] == [
        ("final", "1", True),
        ("dola", "2", False),
    ]
    assert found[-1].answers[1].hit_token_limit  # dola hit the cap on item 9
    assert disagreements(_records(), ["final"]) == []
    console = Console(width=120, record=True)
    console.print(render_disagreements(found, ["final", "dola"], limit=2))
    text = console.export_text()
    assert "6 items where the strategies disagree (first 2 shown)" in " ".join(text.split())
    assert "1 (right)" in text and "2 (wrong)" in text and "5" in text and "7" not in text
