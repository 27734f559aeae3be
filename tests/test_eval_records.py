"""Results store: durable appends, resume, recovery after a kill, config checks, locking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from layerdecode.errors import ConfigError
from layerdecode.eval.records import (
    EvalRecord,
    ResultsStore,
    RunConfig,
    StrategySpec,
    config_differences,
    file_sha256,
    read_results,
)

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("final", "dola")


def make_config(**changes) -> RunConfig:
    values = dict(
        model="tiny-model",
        task="gsm8k",
        task_options={"shots": 0},
        strategies=[
            StrategySpec(name="final"),
            StrategySpec(name="dola", params={"alpha": 0.1, "layers": "low"}),
        ],
        generation={"max_tokens": 256, "temperature": 0.0},
        data_path="data/gsm8k.jsonl",
        data_sha256="0" * 64,
        offset=0,
        limit=None,
    )
    values.update(changes)
    return RunConfig(**values)


def make_record(index: int, strategy: str, size: int = 100) -> EvalRecord:
    """A deterministic record for item ``index`` (``size`` sets the output length)."""
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return EvalRecord(
        item_id=str(index),
        strategy=strategy,
        prompt=[{"role": "user", "content": f"Question {index}?"}],
        output=(f"{strategy}-{index} " * size)[:size] + " The answer is 3.",
        extracted="3",
        gold="3" if index % 2 else "4",
        correct=bool(index % 2),
        n_tokens=5,
        tokens_per_sec=12.5,
        hit_token_limit=index % 3 == 0,
        layers=[3, 3, 1, 2, 3],
        final_layer=3,
        started_at=stamp,
        finished_at=stamp,
    )


def test_record_layer_stats():
    record = make_record(1, "final")
    assert record.share_non_final == pytest.approx(0.4)
    assert record.mean_depth_below_final == pytest.approx(0.6)
    with pytest.raises(ValueError, match="layers must lie in 0..final_layer=3"):
        EvalRecord(**{**record.model_dump(), "layers": [4]})
    with pytest.raises(ValueError, match="Extra inputs"):
        EvalRecord(**{**record.model_dump(), "surprise": 1})


def test_write_read_and_no_duplicates(tmp_path):
    out = tmp_path / "runs" / "results.jsonl"
    with ResultsStore.open(out, make_config()) as store:
        store.append(make_record(1, "final"))
        store.append(make_record(1, "dola"))
        with pytest.raises(ValueError, match="already has a result for item '1', strategy 'final'"):
            store.append(make_record(1, "final"))
        with pytest.raises(ValueError, match="strategy 'other' is not in"):
            store.append(make_record(2, "other"))
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["format"] == "layerdecode-eval/1"
    config, records = read_results(out)
    assert config == make_config()
    assert records == [make_record(1, "final"), make_record(1, "dola")]


def test_existing_file_needs_resume(tmp_path):
    out = tmp_path / "results.jsonl"
    with ResultsStore.open(out, make_config()) as store:
        store.append(make_record(1, "final"))
    with pytest.raises(ConfigError, match="exists; pass --resume to continue it or choose"):
        ResultsStore.open(out, make_config())
    # Resuming a missing file simply starts it.
    with ResultsStore.open(tmp_path / "new.jsonl", make_config(), resume=True) as store:
        assert store.records == []


def test_resume_truncates_partial_line_and_skips_done_pairs(tmp_path):
    out = tmp_path / "results.jsonl"
    with ResultsStore.open(out, make_config()) as store:
        for index in range(3):
            store.append(make_record(index, "final"))
    whole = make_record(3, "final").model_dump_json().encode()
    with out.open("ab") as handle:
        handle.write(whole[: len(whole) // 2])  # as left by a kill mid-write

    _, records = read_results(out)  # a reader ignores the partial line
    assert len(records) == 3
    with ResultsStore.open(out, make_config(), resume=True) as store:
        assert store.dropped_bytes == len(whole) // 2
        assert store.is_done("2", "final") and not store.is_done("2", "dola")
        assert store.pending(["2", "3"]) == [("2", "dola"), ("3", "final"), ("3", "dola")]
        for item_id, strategy in store.pending([str(i) for i in range(4)]):
            store.append(make_record(int(item_id), strategy))
    _, records = read_results(out)
    assert sorted(r.key for r in records) == sorted(
        (str(i), s) for i in range(4) for s in STRATEGIES
    )
    assert out.read_bytes().endswith(b"\n")


def test_resume_refuses_changed_config(tmp_path):
    out = tmp_path / "results.jsonl"
    ResultsStore.open(out, make_config()).close()
    changed = make_config(
        model="other-model",
        strategies=[
            StrategySpec(name="final"),
            StrategySpec(name="dola", params={"alpha": 0.2, "layers": "low"}),
        ],
    )
    with pytest.raises(ConfigError, match=r"differs: model, strategies\.1\.params\.alpha\)"):
        ResultsStore.open(out, changed, resume=True)
    # The data file is identified by its hash, not its path.
    ResultsStore.open(out, make_config(data_path="/elsewhere/g.jsonl"), resume=True).close()
    assert config_differences(make_config(), make_config(limit=5)) == ["limit"]


def test_bad_files_are_refused_with_their_line(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"not": "ours"}\n')
    with pytest.raises(ConfigError, match=r"results\.jsonl:1: not a layerdecode eval results file"):
        ResultsStore.open(out, make_config(), resume=True)
    with ResultsStore.open(tmp_path / "ok.jsonl", make_config()) as store:
        store.append(make_record(1, "final"))
    text = (tmp_path / "ok.jsonl").read_text()
    (tmp_path / "ok.jsonl").write_text(text + text.splitlines()[1] + "\n")
    with pytest.raises(ConfigError, match=r"ok\.jsonl:3: duplicate result for item '1'"):
        read_results(tmp_path / "ok.jsonl")
    (tmp_path / "ok.jsonl").write_text(text + '{"item_id": "2"}\n')
    with pytest.raises(ConfigError, match=r"ok\.jsonl:3: bad result record \(strategy: Field"):
        read_results(tmp_path / "ok.jsonl")


def test_lock_keeps_a_second_writer_out(tmp_path):
    out = tmp_path / "results.jsonl"
    with (
        ResultsStore.open(out, make_config()),
        pytest.raises(ConfigError, match="being written by another layerdecode eval run"),
    ):
        ResultsStore.open(out, make_config(), resume=True)
    ResultsStore.open(out, make_config(), resume=True).close()  # released on close


def test_file_sha256(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_eval_records import make_config, make_record, STRATEGIES
from layerdecode.eval.records import ResultsStore

with ResultsStore.open({out!r}, make_config(), resume=True) as store:
    for item_id, strategy in store.pending([str(i) for i in range({n})]):
        store.append(make_record(int(item_id), strategy, size={size}))
"""


@pytest.mark.slow  # another process
def test_sigkill_mid_run_then_recover_and_resume(tmp_path):
    out = tmp_path / "results.jsonl"
    n, size = 30, 50_000
    script = WRITER.format(tests=str(ROOT / "tests"), out=str(out), n=n, size=size)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.stat().st_size > 6 * size:
            break
        time.sleep(0.005)
    assert child.poll() is None, "writer finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # write(2) on a local file finishes before a kill lands, so a torn line needs a crash of
    # the machine or a full disk; add the tail such a crash would leave.
    torn = make_record(n + 1, "final").model_dump_json().encode()[:-7]
    with out.open("ab") as handle:
        handle.write(torn)

    with ResultsStore.open(out, make_config(), resume=True) as store:
        survived = list(store.records)
        # The appended tail is dropped, and so is a record the kill itself tore, if any (a
        # write of a large line can be cut short under load).
        assert len(torn) <= store.dropped_bytes < len(torn) + 2 * size
    assert 0 < len(survived) < n * len(STRATEGIES)
    expected_order = [(str(i), s) for i in range(n) for s in STRATEGIES]
    assert [r.key for r in survived] == expected_order[: len(survived)]
    for record in survived:
        assert record == make_record(int(record.item_id), record.strategy, size=size)

    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    _, records = read_results(out)
    assert [r.key for r in records] == expected_order
    for record in records:
        assert record == make_record(int(record.item_id), record.strategy, size=size)
