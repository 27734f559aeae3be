"""Per-token figures: changed share, extra head rows, depth histogram, published figures and
accuracy by difficulty, in results, records, summaries, the report and the CLI."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import mlx.core as mx
import pytest
from rich.console import Console

from layerdecode.engine import TokenEvent
from layerdecode.eval.records import EvalRecord, ResultsStore, RunConfig, StrategySpec
from layerdecode.eval.stats import by_difficulty, summarize
from layerdecode.generation import ResultCollector
from layerdecode.layerstats import PUBLISHED, TokenTally, token_stats
from layerdecode.render_stats import depth_table, difficulty_table, token_lines, token_table

from .test_cli import build_tiny_model, run, run_json

STAMP = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def event(token, layer, *, changed=False, head_rows=1, candidates=None, **fields):
    """A TokenEvent of a 4-layer model (final layer 3), with the per-token figures set."""
    return TokenEvent(
        row=0, token=token, layer=layer, entropy=0.5, extras={}, logprobs=mx.zeros((4,)),
        num_layers=4, changed=changed, head_rows=head_rows, candidates=candidates or {},
        **fields,
    )  # fmt: skip


def collected(events):
    collector = ResultCollector([1, 2], "confident")
    for e in events:
        collector.add(e)
    return collector.result()


def test_token_stats_hand_computed():
    # final layer 5; depths 0, 1, 1, 3; two changed; head rows 1 + 3 + 3 + 4 = 11.
    stats = token_stats([5, 4, 4, 2], 5, [False, True, False, True], [1, 3, 3, 4])
    assert stats.tokens == 4 and stats.non_final_share == 0.75 and stats.mean_depth == 1.25
    assert stats.depth_histogram == {0: 1, 1: 2, 3: 1}
    assert stats.changed == 2 and stats.changed_share == 0.5
    assert stats.extra_head_rows == pytest.approx((11 - 4) / 4)


def test_tally_mixes_generations_with_and_without_the_figures():
    tally = TokenTally()
    tally.add([0, 0, 1, 2], changed=1, head_rows=6)
    tally.add([0, 1])  # an older record: neither figure is known
    stats = tally.stats()
    assert stats.tokens == 6 and stats.depth_histogram == {0: 3, 1: 2, 2: 1}
    assert stats.changed == 1 and stats.changed_share == 1 / 4  # over the 4 known tokens
    assert stats.extra_head_rows == pytest.approx(2 / 4)
    empty = TokenTally().stats()
    assert empty.tokens == 0 and empty.changed_share is None and empty.depth_histogram == {}


def test_result_collects_changed_and_head_rows():
    result = collected(
        [
            event(5, 3),
            event(6, 2, changed=True, head_rows=4, candidates={1: 2.0, 2: 0.7, 3: 1.1}),
            event(7, 3, head_rows=4),
            event(2, 3, finish_reason="stop", in_output=False),  # EOS: not part of the output
        ]
    )
    assert result.tokens == [5, 6, 7]
    assert result.changed == [False, True, False] and result.head_rows == [1, 4, 4]
    assert result.candidates[1] == {1: 2.0, 2: 0.7, 3: 1.1}
    assert result.changed_share == pytest.approx(1 / 3)
    assert result.extra_head_rows == pytest.approx(2.0)  # (1 + 4 + 4 - 3) / 3
    data = result.to_dict()
    assert data["changed"] == [False, True, False] and data["head_rows"] == [1, 4, 4]
    assert data["changed_share"] == pytest.approx(1 / 3) and data["extra_head_rows"] == 2.0
    assert data["depth_histogram"] == {"0": 2, "1": 1} and "candidates" not in data
    json.dumps(data)


def test_a_change_that_cannot_be_told_leaves_the_share_unknown():
    from layerdecode.eval.runner import changed_at
    from layerdecode.render import summary_line

    result = collected([event(5, 3), event(6, 2, changed=None)])
    assert result.changed == [False, None] and result.changed_share is None
    assert result.to_dict()["changed_share"] is None
    assert "changed -" in summary_line(result, strategy="confident").plain
    assert changed_at(result.changed) is None and changed_at([False, True, True]) == [1, 2]


def test_summary_line_and_show_layers_lines():
    from layerdecode.render import summary_line

    result = collected([event(5, 3), event(6, 2, changed=True, head_rows=3), event(7, 3)])
    line = summary_line(result, strategy="confident").plain
    assert "changed 33.3%" in line and "+0.67 head rows/token" in line
    lines = [t.plain for t in token_lines(result.token_stats(), "confident")]
    assert lines[0] == "non-final 33.3% · changed 33.33% · +0.667 head rows/token"
    assert lines[1] == "depth below final: 0 ×2 (66.7%) · 1 ×1 (33.3%)"
    assert "Zhang et al. 2026, arXiv 2606.21906" in lines[2]
    assert "non-final 11.5%" in lines[2] and "changed 2.47%" in lines[2]
    assert "+0.116 head rows/token" in lines[2]
    assert len(token_lines(result.token_stats(), "dola")) == 2  # nothing published for DoLa


def make_record(item, strategy, layers, *, changed_at=None, head_rows=None, correct=True, **kw):
    return EvalRecord(
        item_id=str(item), strategy=strategy, prompt="Q", output="x", extracted="1", gold="1",
        correct=correct, n_tokens=len(layers), tokens_per_sec=1.0, hit_token_limit=False,
        layers=layers, final_layer=3, changed_at=changed_at, head_rows=head_rows,
        started_at=STAMP, finished_at=STAMP, **kw,
    )  # fmt: skip


def test_record_derives_changed_and_head_rows():
    r = make_record(0, "confident", [3, 2, 3, 1], changed_at=[1], head_rows=10)
    assert r.n_changed == 1 and r.share_changed == 0.25
    assert r.extra_head_rows_per_token == pytest.approx(1.5)
    again = EvalRecord.model_validate_json(r.model_dump_json())
    assert again == r
    old = make_record(0, "final", [3, 3])  # written before the figures existed
    assert old.n_changed is None and old.share_changed is None
    assert old.extra_head_rows_per_token is None
    with pytest.raises(ValueError, match="changed_at positions"):
        make_record(0, "confident", [3, 3], changed_at=[2])


# Hand-computed: confident's tokens over both items have depths 0,1,0,0 | 2,0,1,0 -> {0: 5,
# 1: 2, 2: 1}; 2 of 8 changed; head rows 6 + 9 = 15 -> (15 - 8) / 8 = 0.875 extra per token.
CONFIDENT = [
    dict(layers=[3, 2, 3, 3], changed_at=[1], head_rows=6),
    dict(layers=[1, 3, 2, 3], changed_at=[0], head_rows=9),
]


def results_file(path, *, levels=("Level 1", "Level 2")):
    config = RunConfig(
        model="tiny-model", task="gsm8k",
        strategies=[
            StrategySpec(name="final", params={"strategy": "final"}),
            StrategySpec(name="mine", params={"strategy": "confident", "window": 3}),
        ],
        data_path="data.jsonl", data_sha256="0" * 64,
    )  # fmt: skip
    with ResultsStore.open(path, config) as store:
        for item, (level, figures) in enumerate(zip(levels, CONFIDENT, strict=True)):
            store.append(
                make_record(item, "final", [3, 3, 3, 3], changed_at=[], head_rows=4,
                            correct=item == 0, difficulty=level)
            )  # fmt: skip
            store.append(make_record(item, "mine", correct=True, difficulty=level, **figures))
    return path


def test_summary_and_report_carry_the_figures(tmp_path):
    path = results_file(tmp_path / "run.jsonl")
    data = run_json("report", str(path))
    final, mine = data["strategies"]
    assert mine["depth_histogram"] == {"0": 5, "1": 2, "2": 1}
    assert mine["tokens_changed"] == 2 and mine["share_changed"] == 0.25
    assert mine["extra_head_rows_per_token"] == pytest.approx(0.875)
    assert final["share_changed"] == 0.0 and final["extra_head_rows_per_token"] == 0.0
    assert final["depth_histogram"] == {"0": 8}
    assert data["published"]["confident"]["changed_share"] == 0.0247
    assert list(data["difficulty"]) == ["Level 1", "Level 2"]
    level2 = data["difficulty"]["Level 2"]
    assert level2["comparisons"][0]["wins"] == 1 and level2["comparisons"][0]["p_value"] == 1.0
    assert [s["accuracy"] for s in level2["strategies"]] == [0.0, 1.0]

    result = run("report", str(path))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "per-token figures" in text and "confident, published" in text
    assert "2 (25.00%)" in text and "+0.875" in text and "11.5%" in text and "2.47%" in text
    assert "Zhang et al. 2026, arXiv 2606.21906" in " ".join(text.split())
    assert "0 (final)" in text and "5 (62.5%)" in text and "2 (25.0%)" in text
    assert "accuracy by difficulty" in text and "Level 2" in text


def test_report_without_levels_or_figures(tmp_path):
    path = tmp_path / "old.jsonl"
    config = RunConfig(
        model="m", task="gsm8k", strategies=[StrategySpec(name="final")], data_path="d",
        data_sha256="0" * 64,
    )  # fmt: skip
    with ResultsStore.open(path, config) as store:
        store.append(make_record(0, "final", [3, 2]))
    data = run_json("report", str(path))
    assert data["difficulty"] == {} and data["published"] == {}
    assert data["strategies"][0]["share_changed"] is None
    text = run("report", str(path)).output
    assert "accuracy by difficulty" not in text and "per-token figures" in text


def test_levels_in_natural_order_and_paired_within_each():
    records = []
    for item, level in enumerate(["Level 10", "Level 2", "Level 2", "3.5", "Level 10"]):
        records.append(make_record(item, "a", [3], correct=False, difficulty=level))
        records.append(make_record(item, "b", [3], correct=level == "Level 2", difficulty=level))
    records.append(make_record(9, "a", [3]))  # no level: only in the overall summary
    levels = by_difficulty(records, ["a", "b"])
    assert list(levels) == ["3.5", "Level 2", "Level 10"]
    two = levels["Level 2"]
    assert two.n_items == 2 and two.comparisons[0].wins == 2 and two.comparisons[0].losses == 0
    assert two.comparisons[0].p_value == 0.5  # exact McNemar, 2 discordant pairs
    console = Console(width=150, record=True)
    console.print(difficulty_table(levels))
    text = console.export_text()
    assert "Level 10" in text and "2/0/0" in text and "0.5" in text
    assert by_difficulty([make_record(0, "a", [3])], ["a"]) == {}


def test_tables_render_hand_computed_rows():
    summary = summarize([make_record(i, "mine", **f) for i, f in enumerate(CONFIDENT)])
    rows = [(s.name, s.token_stats()) for s in summary.strategies]
    console = Console(width=150, record=True)
    console.print(token_table(rows, {"mine": "confident"}))
    console.print(depth_table(rows))
    text = console.export_text()
    assert "2 (25.00%)" in text and "+0.875" in text and "confident, published" in text
    assert "1 (12.5%)" in text  # depth 2: one token of eight
    assert PUBLISHED["confident"].extra_head_rows == 0.116


def test_generate_json_and_summary_line_carry_the_figures(tiny_model):
    data = run_json(
        "generate", "-m", tiny_model, "-s", "confident", "--prompt", "hello", "--max-tokens", "6"
    )
    n = len(data["tokens"])
    assert len(data["changed"]) == n and len(data["head_rows"]) == n
    assert 0.0 <= data["changed_share"] <= data["non_final_share"] or data["changed_share"] == 0
    assert sum(data["depth_histogram"].values()) == n
    result = run(
        "generate", "-m", tiny_model, "-s", "confident", "--prompt", "hello", "--max-tokens",
        "6", "--show-layers",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "head rows/token" in result.stderr and "depth below final:" in result.stderr
    assert "Zhang et al. 2026, arXiv 2606.21906" in " ".join(result.stderr.split())


def test_compare_table_shows_changed_and_head_rows():
    from layerdecode.render import compare_table

    plain = collected([event(5, 3), event(6, 3)])
    mine = collected([event(5, 3), event(6, 2, changed=True, head_rows=3)])
    console = Console(width=120, record=True)
    console.print(compare_table("p", ["final", "confident"], [plain, mine]))
    text = console.export_text()
    assert "0.0%" in text and "50.0%" in text and "+1.00/token" in text


def test_compare_json_carries_the_figures(tiny_model):
    data = run_json(
        "compare", "-m", tiny_model, "-s", "final,confident", "-p", "hello", "--max-tokens", "5"
    )
    for entry in data["prompts"][0]["results"]:
        n = len(entry["tokens"])
        assert len(entry["changed"]) == n and len(entry["head_rows"]) == n
        assert "changed_share" in entry and "extra_head_rows" in entry
    final = data["prompts"][0]["results"][0]
    assert final["changed"] == [False] * len(final["tokens"])
    assert final["head_rows"] == [1] * len(final["tokens"])


def test_lm_eval_model_keeps_the_figures_per_request(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from layerdecode.harness import LayerdecodeLM

    lm = LayerdecodeLM(model=str(tiny_model_dir), strategy="confident", batch_size=2)
    contexts = ["w7 w8 w9", "w30 w31 w32 w33"]
    requests = [
        Instance("generate_until", {}, (c, {"until": ["zzz"], "max_gen_toks": 6}), i)
        for i, c in enumerate(contexts)
    ]
    lm.generate_until(requests)
    tally = TokenTally()
    for count, details in zip(lm.generation_counts, lm.generation_details, strict=True):
        n = len(details["layers"])
        assert n <= count and len(details["changed"]) == n and len(details["head_rows"]) == n
        final = details["final_layer"]
        tally.add([final - x for x in details["layers"]], sum(details["changed"]),
                  sum(details["head_rows"]))  # fmt: skip
    expected = tally.stats()
    stats = lm.generation_stats
    assert stats["non_final_share"] == expected.non_final_share
    assert stats["changed_share"] == expected.changed_share
    assert stats["extra_head_rows_per_token"] == expected.extra_head_rows > 0


PAPER_TASKS = [
    "gpqa_diamond_cot_zeroshot",
    "gpqa_diamond_zeroshot",
    "minerva_math",
    "hendrycks_math",
    "minerva_math500",
    "hrm8k_omni_math_en",
]


@pytest.mark.slow  # lm-eval indexes every task file
def test_the_paper_benchmarks_named_in_the_docs_are_lm_eval_tasks():
    pytest.importorskip("lm_eval")
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    page = (Path(__file__).resolve().parents[1] / "docs" / "lm-eval.md").read_text()
    section = page[page.index("## The Confident Decoding paper's benchmarks") :]
    section = section[: section.index("\n## ", 10)]
    named = set(re.findall(r"`([a-z0-9_]+)`", section)) & set(PAPER_TASKS)
    assert named == set(PAPER_TASKS)
    assert set(PAPER_TASKS) <= set(TaskManager().all_tasks)
