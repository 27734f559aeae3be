"""layerdecode eval end to end: real items with the default model; kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerdecode.eval.records import read_results

from .test_cli import build_tiny_model

# slow: a real model and killed processes
pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k_train_500.jsonl"
SVAMP = DATA / "svamp.jsonl"
# Eight hand-written problems in the GSM8K format, for tests that only need the format.
ARITHMETIC = Path(__file__).resolve().parent / "data" / "arithmetic.jsonl"

needs_data = pytest.mark.skipif(not GSM8K.exists(), reason=f"{DATA} is not present")


@needs_data
@pytest.mark.real_model
def test_eval_on_real_items_with_the_default_model(smollm2, tmp_path):
    from layerdecode.eval.runner import plan_eval, run_eval

    model, tokenizer = smollm2
    plan = plan_eval(
        model="smollm2-135m-instruct",
        task="svamp",
        data=SVAMP,
        strategies=["final", "confident"],
        limit=3,
        max_tokens=48,
    )
    seen = []
    summary, store = run_eval(
        model,
        tokenizer,
        plan,
        tmp_path / "r.jsonl",
        batch_size=3,
        progress=lambda done, total, name: seen.append((done, total)),
    )
    assert seen[-1] == (6, 6)
    config, records = read_results(tmp_path / "r.jsonl")
    assert config.strategy_names == ["final", "confident"]
    assert sorted((r.item_id, r.strategy) for r in records) == sorted(
        (f"chal-{i}", s) for i in (1, 2, 3) for s in ("final", "confident")
    )
    for r in records:
        assert r.final_layer == 29 and len(r.layers) == r.n_tokens
        assert r.hit_token_limit == (r.n_tokens == 48)
        if r.strategy == "final":
            assert set(r.layers) == {29}
    data = summary.to_dict()
    assert [s["name"] for s in data["strategies"]] == ["final", "confident"]


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "layerdecode.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny")
    args = [
        "eval", "--model", str(model_dir), "--task", "gsm8k", "--data", str(ARITHMETIC),
        "--strategies", "final,confident", "--limit", "8", "--max-tokens", "24",
        "--batch-size", "1", "--json",
    ]  # fmt: skip
    reference = tmp_path / "reference.jsonl"
    done = run_cli(*args, "--out", str(reference))
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerdecode.cli", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:  # header + 4 records
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, partial = read_results(out)
    assert 4 <= len(partial) < 16, "the run must be killed mid-way"

    # Without --resume the file is not overwritten; with it, the run completes.
    refused = run_cli(*args, "--out", str(out))
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert [s["n"] for s in summary["strategies"]] == [8, 8]

    _, expected = read_results(reference)
    _, got = read_results(out)
    assert len(got) == 16 == len({r.key for r in got})
    by_key = {r.key: r for r in got}
    for record in expected:
        mine = by_key[record.key]
        assert (mine.output, mine.layers, mine.correct) == (
            record.output,
            record.layers,
            record.correct,
        )

    # A changed configuration is refused instead of mixing results.
    changed = run_cli(*[a if a != "24" else "25" for a in args], "--out", str(out), "--resume")
    assert changed.returncode == 2
    assert "different configuration" in changed.stderr and "max_tokens" in changed.stderr


def test_eval_bad_input(tmp_path):
    bad = run_cli("eval", "--task", "gsm9k", "--data", str(ARITHMETIC), "--limit", "1")
    assert bad.returncode == 2 and "Did you mean 'gsm8k'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("eval", "--task", "gsm8k", "--data", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
    resume = run_cli("eval", "--task", "gsm8k", "--data", str(ARITHMETIC), "--resume")
    assert resume.returncode == 2 and "--resume needs --out" in resume.stderr


def test_evaluate_from_python(tmp_path):
    import layerdecode
    from layerdecode.errors import ConfigError

    model_dir = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run.jsonl"
    common = dict(task="gsm8k", data=ARITHMETIC, strategies=["final", "confident"], limit=3)
    seen = []
    summary = layerdecode.evaluate(
        str(model_dir),
        out=out,
        max_tokens=6,
        batch_size=2,
        progress=lambda done, total, name: seen.append((done, total)),
        **common,
    )
    assert seen[-1] == (6, 6)
    assert [(s.name, s.n) for s in summary.strategies] == [("final", 3), ("confident", 3)]
    config, records = read_results(out)
    assert config.model == str(model_dir) and len(records) == 6

    # A loaded model with its tokenizer: resuming the same run adds nothing and agrees.
    model, tokenizer = layerdecode.load(str(model_dir))
    again = layerdecode.evaluate(
        model, tokenizer, out=out, model_name=str(model_dir), resume=True, max_tokens=6, **common
    )
    assert again.to_dict() == summary.to_dict()
    assert len(read_results(out)[1]) == 6

    with pytest.raises(ConfigError, match="needs its tokenizer"):
        layerdecode.evaluate(model, out=tmp_path / "x.jsonl", **common)
    with pytest.raises(ConfigError, match="Unknown generation options: temperature"):
        layerdecode.evaluate(str(model_dir), out=tmp_path / "x.jsonl", temperature=0.5, **common)
    assert not (tmp_path / "x.jsonl").exists()
