"""The lm-eval model under ``mlx.launch``: two local ranks on the ring backend share the
requests out and give lm-eval exactly what one process gives; rank 0 alone writes.

Each job pays for two process starts and a tiny model: a handful of requests.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

pytest.importorskip("lm_eval")

from layerdecode.distributed import ProcessGroup  # noqa: E402
from layerdecode.errors import ConfigError, LayerdecodeError  # noqa: E402

from .test_distributed import (  # noqa: E402
    MLX_LAUNCH,
    ROOT,
    error_lines,
    finish,
    launch,
    start_ranks,
)

TASKS = ROOT / "tests" / "data" / "lm_eval"
SCRIPT = ROOT / "tests" / "distributed" / "lm_eval_ranks.py"
MODEL_ARGS = "strategy=confident,window=3,batch_size=2,max_tokens=8"
LOCAL_TASKS = ["layerdecode_mc_local", "layerdecode_gsm_local"]

needs_launch = pytest.mark.skipif(not MLX_LAUNCH.exists(), reason=f"{MLX_LAUNCH} not installed")
pytestmark = pytest.mark.cross_process


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Task data paths are relative to the repository root; nothing may reach the hub.
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import lm_eval_ranks
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return lm_eval_ranks


@needs_launch
def test_every_rank_returns_what_one_process_returns(tiny_model_dir):
    one = _script().run(str(tiny_model_dir))
    assert (one["rank"], one["size"]) == (0, 1)
    stdout, stderr = finish(launch(sys.executable, str(SCRIPT), "requests", str(tiny_model_dir)))
    ranks = sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["rank"])
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)], stderr
    expected = json.loads(json.dumps(one))
    # Equal to the last bit: every process multiplies with the same BLAS (the ranks import
    # layerdecode first, and so does tests/conftest.py), and each request is scored in the
    # same batch, of the same shape, by whichever rank computes it.
    for rank in ranks:
        assert rank["blas"] == one["blas"], "the ranks load another BLAS than this process"
        assert rank["lm_eval_rank"] == [0, 1]  # lm-eval sees one process, as with mlx_lm
        for kind in ("loglikelihood", "rolling", "generate", "counts"):
            assert rank[kind] == expected[kind], kind


def _files(out) -> dict[str, object]:
    """The files of an lm-eval run by kind: the results (less when it ran) and each task's
    samples, exactly as written."""
    [results] = out.rglob("results_*.json")
    files: dict[str, object] = {"results": json.loads(results.read_text())}
    for key in ("date", "total_evaluation_time_seconds"):
        files["results"].pop(key)
    for task in LOCAL_TASKS:
        [samples] = out.rglob(f"samples_{task}_*.jsonl")
        files[task] = samples.read_text()
    assert len(list(out.rglob("*.json*"))) == 1 + len(LOCAL_TASKS)
    return files


@needs_launch
def test_two_ranks_write_the_files_of_one_process(tiny_model_dir, tmp_path, monkeypatch):
    from functools import partialmethod

    from click.testing import CliRunner
    from lm_eval.tasks import TaskManager

    from layerdecode.cli import cli

    args = ["lm-eval", "--model_args", f"model={tiny_model_dir},{MODEL_ARGS}"]
    args += ["--tasks", ",".join(LOCAL_TASKS), "--include_path", str(TASKS)]
    args += ["--limit", "5", "--log_samples", "--output_path"]
    # As the helper script does: index only the local tasks.
    init = partialmethod(TaskManager.__init__, include_defaults=False)
    monkeypatch.setattr(TaskManager, "__init__", init)
    done = CliRunner().invoke(cli, [*args, str(tmp_path / "one")])
    assert done.exit_code == 0, done.output

    stdout, stderr = finish(
        launch(sys.executable, str(SCRIPT), "cli", *args, str(tmp_path / "two"))
    )
    assert error_lines(stderr) == [], stderr
    assert stdout.count("|layerdecode_mc_local ") == 1  # rank 0's table alone

    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")  # one writer: one set
    assert two == one
    samples = [json.loads(line) for line in two["layerdecode_gsm_local"].splitlines()]
    assert sorted({s["doc_id"] for s in samples}) == [0, 1, 2, 3, 4]  # per filter, once
    assert len(samples) == 10 and any(s["resps"][0][0].strip() for s in samples)
    assert "acc,none" in two["results"]["results"]["layerdecode_mc_local"]


@needs_launch
def test_a_dead_rank_ends_the_job_with_one_line(tiny_model_dir, tmp_path):
    args = ["lm-eval", "--model_args", f"model={tiny_model_dir},{MODEL_ARGS}"]
    args += ["--tasks", "layerdecode_gsm_local", "--include_path", str(TASKS), "--limit", "4"]
    args += ["--output_path", str(tmp_path / "out")]
    # LAYERDECODE_DISTRIBUTED_TIMEOUT: a bound, should the backend not notice.
    ranks = start_ranks(
        tmp_path,
        [sys.executable, str(SCRIPT), "cli", *args],
        LM_EVAL_DIE_ON_RANK="1",
        LAYERDECODE_DISTRIBUTED_TIMEOUT="30",
    )
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert ranks[1].returncode == 3  # it died where the helper made it die
    assert ranks[0].returncode == 1
    [line] = error_lines(stderr)
    assert line.startswith("error: rank 0: ") and "another rank has died" in line
    assert not list((tmp_path / "out").rglob("*.json"))


def test_a_split_model_is_refused(monkeypatch):
    from layerdecode.harness import ranks

    monkeypatch.setattr(ranks, "init", lambda: ProcessGroup(rank=1, size=2, mode="tensor"))
    with pytest.raises(ConfigError, match="unset LAYERDECODE_DISTRIBUTED") as err:
        ranks.join()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(ranks, "init", lambda: ProcessGroup(rank=1, size=2, mode="data"))
    assert ranks.join().shares == 2


class _Peer(ProcessGroup):
    """Rank 0 of two whose peer answers with ``peer(data)``: the exchange without a network."""

    def __init__(self, peer):
        super().__init__(rank=0, size=2)
        self.peer = peer

    def exchange(self, data: bytes) -> list[bytes]:
        return [data, self.peer(data)]


def test_chunks_are_dealt_in_rounds_and_come_back_in_order():
    from lm_eval.api.instance import Instance

    from layerdecode.harness.ranks import shared

    requests = [Instance("loglikelihood", {}, ("a", str(i)), i) for i in range(5)]
    chunks = [[0, 1], [2, 3], [4]]
    computed = []

    def compute(chunk):
        computed.append(chunk)
        return [[i, i * 0.5] for i in chunk]

    # Rank 1 agrees on the requests (None: it sends what rank 0 sends), then computes the
    # second chunk of each round, and nothing in the last.
    answers = [None, json.dumps([[2, 1.0], [3, 1.5]]).encode(), b"[]"]
    peer = _Peer(lambda data: answers.pop(0) or data)
    assert shared(peer, requests, chunks, compute, "loglikelihood") == [
        [[0, 0.0], [1, 0.5]],
        [[2, 1.0], [3, 1.5]],
        [[4, 2.0]],
    ]
    assert computed == [[0, 1], [4]] and not answers  # rank 0's share: chunks 0 and 2

    other = _Peer(lambda data: b'[3, "another digest"]')
    with pytest.raises(LayerdecodeError, match="rank 0: the ranks were given different"):
        shared(other, requests, chunks, compute, "loglikelihood")
