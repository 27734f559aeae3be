"""Several ranks on MLX's ring backend: data-parallel eval, tensor-parallel generation, and
what happens when a rank dies, hangs or cannot join.

Jobs run as two local ranks, started by ``mlx.launch`` (or by hand, to kill one rank), so
each test pays for process start and model loading: tiny models, a handful of items.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerdecode.cli import cli
from layerdecode.eval.records import read_results

from .test_cli import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ARITHMETIC = ROOT / "tests" / "data" / "arithmetic.jsonl"  # eight GSM8K-style items
TP_SCRIPT = ROOT / "tests" / "distributed" / "tp_generate.py"
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"

# Ranks (other processes) are compared with one process, so each side must load the same
# BLAS: tests/conftest.py imports layerdecode first, as every rank does.
pytestmark = [
    pytest.mark.skipif(not MLX_LAUNCH.exists(), reason=f"{MLX_LAUNCH} not installed"),
    pytest.mark.cross_process,
]


def free_ports() -> int:
    """A port P such that P and P + 1 (one per rank) are free on this machine."""
    for _ in range(100):
        port = random.randrange(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def launch(*command: str, **kwargs) -> subprocess.Popen:
    """Two ranks of ``command`` under mlx.launch, in a process group of their own.

    The ranks inherit this environment (LD_PRELOAD, the virtual environment's Python).
    """
    return subprocess.Popen(
        [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "-p", str(free_ports()), "--", *command],
        cwd=ROOT,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def layerdecode_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerdecode.cli", *args]


def wait_for_records(path: Path, count: int, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count + 1:  # + header
            return
        if all(p.poll() is not None for p in procs):
            raise AssertionError(f"the job ended before {path} had {count} records")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} records in {timeout} s")


def comparable(records) -> list[tuple]:
    return sorted(
        (r.item_id, r.strategy, r.output, tuple(r.layers), r.correct, r.extracted) for r in records
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


# -- data-parallel eval ----------------------------------------------------------------------


@pytest.mark.real_model
def test_two_ranks_write_the_records_of_one(smollm2, tmp_path):
    from layerdecode.eval.runner import plan_eval, run_eval

    options = dict(task="gsm8k", data=ARITHMETIC, strategies=["final", "confident"])
    plan = plan_eval(model="smollm2-135m-instruct", max_tokens=8, **options)
    model, tokenizer = smollm2
    run_eval(model, tokenizer, plan, tmp_path / "one.jsonl", batch_size=4)

    out = tmp_path / "two.jsonl"
    args = ["-t", "gsm8k", "-d", str(ARITHMETIC), "-s", "final,confident", "--max-tokens", "8"]
    stdout, stderr = finish(
        launch(*layerdecode_cli("eval", *args, "--batch-size", "4", "-o", str(out)))
    )
    assert "error" not in stderr, stderr
    assert "results:" in stderr and "final" in stdout  # rank 0's summary

    config, two = read_results(out)
    _, one = read_results(tmp_path / "one.jsonl")
    assert config == plan.config
    assert len(two) == 16 and comparable(two) == comparable(one)
    # One writer, in item order: the eight items, each with both strategies.
    assert [r.item_id for r in two] == [i for i in "12345678" for _ in range(2)]


def test_killed_job_resumes_without_loss_or_duplicates(tiny_dir, tmp_path):
    args = [
        "eval", "-m", str(tiny_dir), "-t", "gsm8k", "-d", str(ARITHMETIC),
        "-s", "final,confident", "--max-tokens", "48", "--batch-size", "1", "--json",
    ]  # fmt: skip
    reference = tmp_path / "reference.jsonl"
    done = CliRunner().invoke(cli, [*args, "-o", str(reference)])
    assert done.exit_code == 0, done.output

    out = tmp_path / "killed.jsonl"
    job = launch(*layerdecode_cli(*args, "-o", str(out)))
    try:
        wait_for_records(out, 4, [job])  # one round: two items, one per rank
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks
        job.communicate()
    _, partial = read_results(out)
    assert 4 <= len(partial) < 16, "the job must be killed mid-way"

    stdout, stderr = finish(launch(*layerdecode_cli(*args, "-o", str(out), "--resume")))
    assert "error" not in stderr, stderr
    summary = json.loads(stdout)  # one JSON document: rank 1 printed nothing
    assert [s["n"] for s in summary["strategies"]] == [8, 8]
    _, got = read_results(out)
    _, expected = read_results(reference)
    assert len(got) == 16 == len({r.key for r in got})
    assert comparable(got) == comparable(expected)


# -- tensor-parallel generation --------------------------------------------------------------


def test_split_models_decode_like_the_whole(tmp_path):
    from layerdecode.testing import save_tiny_model

    sys.path.insert(0, str(TP_SCRIPT.parent))
    try:
        from tp_generate import main
    finally:
        sys.path.remove(str(TP_SCRIPT.parent))

    paths = [str(save_tiny_model(tmp_path / arch, arch)) for arch in ("llama", "qwen3")]
    whole = main(paths)["models"]
    stdout, stderr = finish(launch(sys.executable, str(TP_SCRIPT), *paths), timeout=120)
    ranks = sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["rank"])
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)], stderr
    for path in paths:
        for rank in ranks:
            split = rank["models"][path]
            assert split["q_rows"] * 2 == whole[path]["q_rows"]  # really split in two
            assert split["results"] == whole[path]["results"]
        # Some token comes from below the final layer (5): early exits are replicated too.
        layers = {layer for r in whole[path]["results"].values() for layer in r["layers"]}
        assert layers != {5}


def test_compare_on_a_split_model_prints_once(tiny_dir):
    args = ["compare", "-m", str(tiny_dir), "-s", "final,confident,dola", "-p", "the cat"]
    args += ["--max-tokens", "10", "--json"]
    whole = CliRunner().invoke(cli, args)
    assert whole.exit_code == 0, whole.output
    stdout, stderr = finish(launch(*layerdecode_cli(*args)), timeout=120)
    assert "error" not in stderr, stderr
    split = json.loads(stdout)["prompts"][0]["results"]  # exactly one document: rank 0's
    reference = json.loads(whole.stdout)["prompts"][0]["results"]
    for mine, ref in zip(split, reference, strict=True):
        assert (mine["tokens"], mine["layers"]) == (ref["tokens"], ref["layers"])


def test_a_model_whose_heads_do_not_divide_is_refused():
    from types import SimpleNamespace

    from layerdecode.errors import ModelError
    from layerdecode.loading import _check_split

    smollm2_like = SimpleNamespace(
        args=SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)
    )
    with pytest.raises(ModelError, match="9 attention heads, which 2 ranks cannot split"):
        _check_split(smollm2_like, "smollm2-135m-instruct", 2)
    _check_split(smollm2_like, "smollm2-135m-instruct", 3)


# -- failures --------------------------------------------------------------------------------


def ring_hostfile(tmp_path: Path) -> tuple[Path, int]:
    """A two-rank ring hostfile on 127.0.0.1 over free ports P and P + 1: (path, P)."""
    port = free_ports()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return hostfile, port


def run_rank0(hostfile: Path, *args: str) -> subprocess.CompletedProcess:
    """``layerdecode ARGS`` as rank 0 of a job described by ``hostfile``, to completion."""
    return subprocess.run(
        layerdecode_cli(*args),
        env={**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_ranks(tmp_path: Path, command: list[str], **env: str) -> list[subprocess.Popen]:
    """The two ranks of a ring job started by hand, as mlx.launch would (MLX_RANK, hostfile),
    each in a process group of its own."""
    hostfile, _ = ring_hostfile(tmp_path)
    base = {**os.environ, "MLX_HOSTFILE": str(hostfile), **env}
    return [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**base, "MLX_RANK": str(rank)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_dead_or_stuck_rank_ends_the_job(fault, tiny_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["eval", "-m", str(tiny_dir), "-t", "gsm8k", "-d", str(ARITHMETIC), "-s", "final"]
    args += ["--max-tokens", "48", "--batch-size", "1", "-o", str(out)]
    ranks = start_ranks(tmp_path, layerdecode_cli(*args), LAYERDECODE_DISTRIBUTED_TIMEOUT="4")
    try:
        wait_for_records(out, 2, ranks)
        ranks[1].send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        _, stderr = ranks[0].communicate(timeout=90)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert ranks[0].returncode == 1
    [line] = error_lines(stderr)
    assert line.startswith("error: rank 0: ")
    assert ("another rank has died" if fault == "dies" else "no word from the other ranks") in line
    assert len(read_results(out)[1]) < 8


def test_a_wrong_hostfile_is_one_line(tiny_dir, tmp_path):
    bad = tmp_path / "hosts.json"
    for content, needle in [("{oops", "not valid JSON"), ('["127.0.0.1:1"]', "list of at least")]:
        bad.write_text(content)
        done = run_rank0(bad, "generate", "-m", str(tiny_dir), "-p", "hi")
        assert done.returncode == 2
        [line] = error_lines(done.stderr)
        assert str(bad) in line and needle in line


def test_a_port_in_use_is_one_line(tiny_dir, tmp_path):
    hostfile, port = ring_hostfile(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = run_rank0(hostfile, "generate", "-m", str(tiny_dir), "-p", "hi")
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "rank 0" in line and "bind" in line and "ports are free" in line


def test_modes_and_single_process(monkeypatch, tmp_path):
    from layerdecode.distributed import ProcessGroup, init
    from layerdecode.errors import ConfigError

    for name in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    group = init()
    assert (group.size, group.is_main, group.shares, group.tensor) == (1, True, 1, False)
    assert group.broadcast(b"abc") == b"abc" and group.gather(b"x") == [b"x"]
    with pytest.raises(ConfigError, match="pipeline parallelism is not supported"):
        init("pipeline")
    with pytest.raises(ConfigError, match="Unknown distributed mode 'both'"):
        init("both")
    refused = CliRunner().invoke(
        cli, ["eval", "-t", "gsm8k", "-d", str(ARITHMETIC), "--distributed", "pipeline"]
    )
    assert refused.exit_code == 2 and "use --distributed tensor" in refused.stderr
    monkeypatch.setenv("LAYERDECODE_DISTRIBUTED_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="positive number of seconds"):
        init()
    # mlx.launch -n 1 hands its one rank an empty hostfile: a single process.
    (tmp_path / "hosts.json").write_text("\n")
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    monkeypatch.delenv("LAYERDECODE_DISTRIBUTED_TIMEOUT")
    assert init().size == 1
    split = ProcessGroup(rank=1, size=2, mode="tensor")
    assert (split.tensor, split.shares, split.share, split.is_main) == (True, 1, 0, False)
    data = ProcessGroup(rank=1, size=2, mode="data")
    assert (data.tensor, data.shares, data.share) == (False, 2, 1)
