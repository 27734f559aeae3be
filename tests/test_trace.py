"""Per-token Parquet traces: the writer, its parts, reading back after a kill, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerdecode.errors import ConfigError
from layerdecode.trace import COLUMNS, TraceWriter, read_trace, require_pyarrow, trace_status

from .test_cli import build_tiny_model, run, run_json

ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC = ROOT / "tests" / "data" / "arithmetic.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def write_rows(writer: TraceWriter, n: int, item: str = "a", start: int = 0) -> None:
    for i in range(start, start + n):
        writer.add(
            item, "confident", i, token=i, layer=5 - i % 2, final_layer=5, changed=i % 3 == 0,
            head_rows=1 + i % 4, entropy=0.25 * i, candidates={4: 1.0 + i, 5: 2.0},
        )  # fmt: skip


def test_rows_flushed_in_parts_and_read_back(tmp_path):
    path = tmp_path / "run.parquet"
    with TraceWriter(path, rows_per_group=4, decode=lambda t: f"<{t}>", run_id="r1") as writer:
        write_rows(writer, 10)
        assert len(list(path.glob("part-*.parquet"))) == 2  # 8 rows flushed, 2 waiting
    names = sorted(p.name for p in path.iterdir())
    assert names == ["_trace.json", *(f"part-00000{i}.parquet" for i in range(3))]
    table = read_trace(path)
    assert table.column_names == list(COLUMNS) and table.num_rows == 10
    rows = table.to_pylist()
    assert [r["position"] for r in rows] == list(range(10))
    assert rows[3] == {
        "run_id": "r1", "item_id": "a", "strategy": "confident", "position": 3, "token_id": 3,
        "token_text": "<3>", "part": "answer", "layer": 4, "depth": 1, "changed": True,
        "head_rows": 4, "entropy": 0.75,
        "candidates": [{"layer": 4, "entropy": 4.0}, {"layer": 5, "entropy": 2.0}],
    }  # fmt: skip
    assert str(table.schema.field("candidates").type) == (
        "list<element: struct<layer: int16, entropy: float>>"
    )
    assert trace_status(path) == {"run_id": "r1", "complete": True, "parts": 3, "rows": 10}
    # A dataset reader takes the directory as one table (it passes over _trace.json).
    import pyarrow.dataset as ds

    assert ds.dataset(path, format="parquet").to_table().num_rows == 10


def test_resume_adds_parts_and_keeps_the_run_id(tmp_path):
    path = tmp_path / "run.parquet"
    with TraceWriter(path, rows_per_group=3) as first:
        write_rows(first, 4)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        TraceWriter(path)
    (path / ".part-000009.parquet.tmp").write_bytes(b"PAR1 torn")  # left by a killed run
    with TraceWriter(path, rows_per_group=3, resume=True) as again:
        assert again.run_id == first.run_id
        write_rows(again, 2, item="b")
    table = read_trace(path)
    assert table.num_rows == 6 and set(table.column("run_id").to_pylist()) == {first.run_id}
    assert table.column("item_id").to_pylist() == ["a"] * 4 + ["b"] * 2
    assert not list(path.glob(".*.tmp"))


def test_bad_paths_and_parts(tmp_path):
    a_file = tmp_path / "trace.parquet"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file; a trace is a directory"):
        TraceWriter(a_file)
    with pytest.raises(ConfigError, match="not found"):
        read_trace(tmp_path / "missing")
    with pytest.raises(ConfigError, match="rows_per_group"):
        TraceWriter(tmp_path / "t", rows_per_group=0)
    path = tmp_path / "run.parquet"
    with TraceWriter(path, rows_per_group=2) as writer:
        write_rows(writer, 6)
    (path / "part-000001.parquet").write_bytes(b"not parquet")  # a copy cut short
    with pytest.warns(UserWarning, match="part-000001.parquet: skipped"):
        table = read_trace(path)
    assert table.column("position").to_pylist() == [0, 1, 4, 5]
    unused = tmp_path / "unused.parquet"
    TraceWriter(unused)  # opened, never written: a run that stopped before its first row
    with TraceWriter(unused) as writer:
        write_rows(writer, 1)
    assert read_trace(unused).num_rows == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_trace(empty).num_rows == 0 and read_trace(empty).column_names == list(COLUMNS)


# The child decodes without end (tiny model, no tokenizer, no budget) and says after every
# flush how many parts it has written; the test kills it with SIGKILL after three.
CHILD = """
import sys
from layerdecode.generation import generate_step
from layerdecode.testing import tiny_model
from layerdecode.trace import TraceWriter

writer = TraceWriter(sys.argv[1], rows_per_group=16)
flush = writer.flush
def announce():
    flush()
    print("parts", writer.next_part, flush=True)
writer.flush = announce
model = tiny_model("llama")
for position, event in enumerate(generate_step([1, 2, 3], model, "confident", max_tokens=-1)):
    writer.add_event("item-1", "confident", position, event)
"""


@pytest.mark.slow  # another process, killed
def test_a_killed_run_keeps_the_parts_it_wrote(tmp_path):
    path = tmp_path / "killed.parquet"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        parts = 0
        while parts < 3 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            parts = int(line.split()[1])
        assert parts >= 3, "the child wrote no parts"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    status = trace_status(path)
    assert not status["complete"] and status["parts"] >= 3
    table = read_trace(path)
    assert table.num_rows == 16 * status["parts"]
    assert table.column("position").to_pylist() == list(range(table.num_rows))
    assert set(table.column("item_id").to_pylist()) == {"item-1"}


def test_without_pyarrow_one_line_says_how_to_install(monkeypatch, tiny_model, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'layerdecode[trace]'")):
        require_pyarrow()
    result = run("generate", "-m", tiny_model, "--prompt", "hi", "--trace", str(tmp_path / "t"))
    assert result.exit_code != 0
    assert "pip install 'layerdecode[trace]'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_generate_trace_matches_the_json(tiny_model, tmp_path):
    path = tmp_path / "gen.parquet"
    data = run_json(
        "generate", "-m", tiny_model, "-s", "confident", "--prompt", "hello", "--max-tokens", "7",
        "--trace", str(path),
    )  # fmt: skip
    rows = read_trace(path).to_pylist()
    assert [r["token_id"] for r in rows] == data["tokens"]
    assert [r["layer"] for r in rows] == data["layers"]
    assert [r["changed"] for r in rows] == data["changed"]
    assert [r["head_rows"] for r in rows] == data["head_rows"]
    assert {r["strategy"] for r in rows} == {"confident"} and rows[0]["item_id"] == "0"
    assert all(isinstance(r["token_text"], str) for r in rows)
    for r in rows:  # the chosen layer is among those read, with the same entropy
        read = {c["layer"]: c["entropy"] for c in r["candidates"]}
        assert r["layer"] in read and read[r["layer"]] == pytest.approx(r["entropy"], rel=1e-5)
    assert json.loads((path / "_trace.json").read_text())["complete"] is True
    again = run("generate", "-m", tiny_model, "--prompt", "hello", "--trace", str(path))
    assert again.exit_code != 0 and "exists and is not empty" in again.output


def test_eval_trace_has_every_pair_and_resume_adds_to_it(tiny_model, tmp_path):
    out, path = tmp_path / "r.jsonl", tmp_path / "eval.parquet"
    args = ["eval", "-m", tiny_model, "-t", "gsm8k", "-d", str(ARITHMETIC), "-s", "final,confident"]
    args += ["--max-tokens", "5", "--batch-size", "1", "-o", str(out), "--trace", str(path)]
    first = run(*args, "--limit", "2")
    assert first.exit_code == 0, first.output
    assert "per-token figures" in first.output and "confident, published" in first.output
    rows = read_trace(path).to_pylist()
    from layerdecode.eval.records import read_results

    _, records = read_results(out)
    assert sum(r.n_tokens for r in records) == len(rows)
    for r in records:
        mine = [x for x in rows if x["item_id"] == r.item_id and x["strategy"] == r.strategy]
        assert [x["layer"] for x in mine] == r.layers
        assert [x["position"] for x in mine] == list(range(len(r.layers)))
        assert [i for i, x in enumerate(mine) if x["changed"]] == r.changed_at
        assert sum(x["head_rows"] for x in mine) == r.head_rows
        if r.strategy == "final":
            assert r.changed_at == [] and r.head_rows == r.n_tokens
        else:
            assert r.head_rows > r.n_tokens  # confident reads layers below the final one
            assert all(len(x["candidates"]) > 1 for x in mine)
    # A run killed before item 2's pairs were recorded: neither their records nor their
    # parts (each pair is flushed before its record) are there.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    import pyarrow.parquet as pq

    for part in path.glob("part-*.parquet"):
        if set(pq.read_table(part).column("item_id").to_pylist()) == {"2"}:
            part.unlink()
    resumed = run(*args, "--limit", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    table = read_trace(path).to_pylist()
    _, records = read_results(out)
    assert sorted((x["item_id"], x["strategy"], x["position"]) for x in table) == sorted(
        (r.item_id, r.strategy, i) for r in records for i in range(r.n_tokens)
    )
    assert len({x["run_id"] for x in table}) == 1


def test_the_worked_example_of_the_docs_runs(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    from layerdecode.plots import plot_trace_entropy
    from layerdecode.trace import entropy_by_depth

    text = (ROOT / "docs" / "traces.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    with TraceWriter("run.parquet", rows_per_group=5) as writer:
        write_rows(writer, 12)  # strategy "confident", final layer 5, reads layers 4 and 5
        writer.add("a", "final", 0, token=1, layer=5, final_layer=5, candidates={5: 3.0})
    exec(compile(blocks[0], "docs/traces.md", "exec"), {})
    assert (tmp_path / "entropy-by-depth.png").stat().st_size > 0
    import pyarrow.compute as pc

    table = read_trace("run.parquet")
    means = entropy_by_depth(table.filter(pc.equal(table.column("strategy"), "confident")))
    # Rows 0, 3, 6, 9 changed: their layer-4 entropies are 1 + i, layer 5 always 2.
    assert means["changed"] == {0: (2.0, 4), 1: (1.0 + 4.5, 4)}
    assert means["unchanged"][1] == (1.0 + sum(i for i in range(12) if i % 3) / 8, 8)
    plot_trace_entropy("run.parquet", tmp_path / "again.png", title="t")
    assert (tmp_path / "again.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="no candidate entropies"):
        empty = tmp_path / "empty.parquet"
        with TraceWriter(empty) as writer:
            writer.add("a", "final", 0, token=1, layer=5, final_layer=5)
        plot_trace_entropy(empty, tmp_path / "none.png")
