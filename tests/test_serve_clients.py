"""Other clients against ``layerdecode serve``: the ``llm`` command-line tool and lm-eval's
``local-completions`` model, each as its users run it, against a server started here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_serve import Server

pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

pytestmark = [pytest.mark.real_model, pytest.mark.cross_process, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def server():
    with Server(MODEL, "--strategy", "confident", "--max-tokens-limit", "256") as s:
        yield s


def llm_env(tmp_path: Path, server: Server) -> dict[str, str]:
    """An ``llm`` user directory whose extra OpenAI model is this server."""
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: layerdecode-local\n  model_name: {MODEL}\n  api_base: {server.url}/v1\n",
        encoding="utf-8",
    )
    return {**os.environ, "LLM_USER_PATH": str(home), "OPENAI_API_KEY": "none"}


def run_llm(args: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    exe = shutil.which("llm", path=str(Path(sys.executable).parent)) or shutil.which("llm")
    if exe is None:
        pytest.skip("the llm command-line tool is not installed (dev extra)")
    done = subprocess.run(
        [exe, *args], env=env, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_llm_tool_prompts_and_chats(tmp_path, server):
    env = llm_env(tmp_path, server)
    options = ["-o", "temperature", "0", "-o", "max_tokens", "12"]
    answer = run_llm(
        ["-m", "layerdecode-local", *options, "What is the capital of France? One word."], env
    )
    assert "Paris" in answer
    # Two turns of `llm chat`: the second request carries the first exchange.
    run_llm(
        ["chat", "-m", "layerdecode-local", *options],
        env,
        stdin="My name is Ada. Say hello to me.\nWhat is my name?\nquit\n",
    )
    logs = json.loads(run_llm(["logs", "--json", "-n", "3"], env))
    chat = [entry for entry in logs if entry["prompt"] in ("My name is Ada. Say hello to me.",
                                                            "What is my name?")]  # fmt: skip
    assert len(chat) == 2 and chat[0]["conversation_id"] == chat[1]["conversation_id"]
    first, second = sorted(chat, key=lambda e: e["datetime_utc"])
    assert second["prompt"] == "What is my name?" and second["response"]
    # The second request held the first exchange: its prompt is longer than the first
    # prompt and answer together (usage as the server reported it).
    assert second["input_tokens"] > first["input_tokens"] + first["output_tokens"]


def test_lm_eval_local_completions_equals_layerdecode_lm_eval(server, monkeypatch):
    """lm-eval's OpenAI-completions model scores a log-likelihood task through the server
    (echo with logprobs, the tokenizer endpoints) as the in-process model does."""
    import lm_eval
    import lm_eval.models.openai_completions  # noqa: F401 - registers "local-completions"
    from lm_eval.tasks import TaskManager

    import layerdecode.harness  # noqa: F401 - registers "layerdecode"

    monkeypatch.chdir(DATA.parent.parent.parent)  # the task's data path is relative
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(model, args):
        return lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["layerdecode_mc_local"],
            task_manager=TaskManager(include_path=str(DATA)), log_samples=True, limit=6,
        )  # fmt: skip

    remote = run(
        "local-completions",
        f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1",
    )
    local = run("layerdecode", f"model={MODEL},strategy=confident,batch_size=1")
    theirs = remote["samples"]["layerdecode_mc_local"]
    ours = local["samples"]["layerdecode_mc_local"]
    assert len(theirs) == len(ours) == 6
    for a, b in zip(theirs, ours, strict=True):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
        ):
            assert lp_a == pytest.approx(lp_b, rel=1e-4, abs=1e-4)
            assert greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            remote["results"]["layerdecode_mc_local"][metric]
            == local["results"]["layerdecode_mc_local"][metric]
        )
