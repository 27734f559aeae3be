"""Thinking models: the reasoning apart from the answer, in every face.

The think model is a tiny random llama (seed 52) whose vocabulary has ``<think>`` and
``</think>`` and whose chat template opens ``<think>`` unless ``enable_thinking`` is false.
Asked "w9 w10", it greedily writes ``w8 w11 </think> w15 w15 w15 w17 w14`` in 8 tokens:
the reasoning "w8 w11 ", then the answer "w15 w15 w15 w17 w14".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerdecode import ConfigError, batch_generate, build_prompt, generate, load, stream_generate
from layerdecode.reasoning import ReasoningSplitter, initial_state, split_reasoning
from layerdecode.testing import tiny_tokenizer
from layerdecode.text import OutputStream

THINK_WORDS = ["<unk>", "<s>", "</s>", "<system>", "<user>", "<assistant>", "<think>", "</think>"]
THINK_WORDS += [f"w{i}" for i in range(8, 24)]
THINK_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> "
    "{% if enable_thinking is not defined or enable_thinking %}<think> {% endif %}{% endif %}"
)
QUESTION = "w9 w10"
REASONING = "w8 w11 "
ANSWER = "w15 w15 w15 w17 w14"
PARTS = ["reasoning"] * 3 + ["answer"] * 5
# Without thinking the same model answers at once.
PLAIN_ANSWER = "w11 w10 w17 <assistant> w10 w17 <assistant> <assistant>"
NO_THINKING = {"enable_thinking": False}

HARMONY_WORDS = ["<unk>", "<s>", "</s>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>"]
HARMONY_WORDS += ["user", "assistant", "analysis", "final", "commentary", "x", "y", "z"]


def save_think_model(path: Path) -> Path:
    from transformers import AutoTokenizer

    from layerdecode.testing import save_tiny_model

    save_tiny_model(path, words=THINK_WORDS, num_layers=4, seed=52)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory) -> Path:
    return save_think_model(tmp_path_factory.mktemp("think") / "think-llama")


@pytest.fixture(scope="module")
def think(think_dir):
    return load(str(think_dir))


def think_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# -- splitting, by text and token by token ---------------------------------------------------


@pytest.fixture(scope="module")
def think_tokenizer():
    return tiny_tokenizer(words=[*THINK_WORDS, "a", "b", "c"])


@pytest.mark.parametrize(
    ("prompt", "output", "answer", "reasoning"),
    [
        ("<assistant> <think>", "a b </think> c", "c", "a b "),
        ("<assistant>", "<think> a </think> b c", "b c", "a "),
        ("<assistant>", "a b c", "a b c", None),
        ("<assistant> <think> a </think>", "b c", "b c", None),  # closed in the prompt
        ("<assistant> <think>", "a b c", "", "a b c"),  # never closed
        ("<assistant>", "a </think> b", "a </think> b", None),  # nothing was opened
        ("<assistant>", "a <think> b </think> c", "a c", "b "),
    ],
)
def test_think_blocks_split_by_text(think_tokenizer, prompt, output, answer, reasoning):
    ids = think_ids(think_tokenizer, prompt)
    assert split_reasoning(think_tokenizer, output, ids) == (answer, reasoning)


@pytest.mark.parametrize(
    ("prompt", "output"),
    [
        ("<assistant> <think>", "a b </think> c a"),
        ("<assistant>", "<think> a </think> b c"),
        ("<assistant>", "a <think> b </think> c </think> a"),
        ("<assistant> <think>", "a b c"),
    ],
)
def test_token_by_token_gives_the_split_of_the_whole_text(think_tokenizer, prompt, output):
    tokenizer = think_tokenizer
    ids = think_ids(tokenizer, prompt)
    tokens = think_ids(tokenizer, output)
    stream = OutputStream(tokenizer, max_tokens=len(tokens), prompt=ids)
    released = [stream.feed(token) for token in tokens]
    whole_answer, whole_reasoning = split_reasoning(tokenizer, tokenizer.decode(tokens), ids)
    assert "".join(r.text for r in released) == whole_answer
    assert "".join(r.reasoning for r in released) == (whole_reasoning or "")
    assert released[-1].finish == "length"
    # A token is the answer's only when it is read wholly in the answer.
    words = output.split()
    inside = prompt.endswith("<think>")
    for word, piece in zip(words, released, strict=True):
        opens, closes = word == "<think>", word == "</think>" and inside
        assert piece.part == ("reasoning" if inside or opens else "answer"), (word, piece)
        inside = (inside or opens) and not closes


def test_held_back_marker_text_is_released_at_the_end(think_tokenizer):
    # "<thi" may start "<think>": held back until the output ends.
    splitter = ReasoningSplitter.for_prompt(think_tokenizer, ())
    assert splitter.add("a <thi") == ("a ", "", "answer")
    assert splitter.finish() == ("<thi", "", "answer")


# -- gpt-oss harmony channels ----------------------------------------------------------------


@pytest.fixture(scope="module")
def harmony():
    return tiny_tokenizer(words=HARMONY_WORDS)


HARMONY_OUTPUT = (
    "<|channel|> analysis <|message|> x y <|end|> "
    "<|start|> assistant <|channel|> commentary <|message|> z <|end|> "
    "<|start|> assistant <|channel|> final <|message|> y x"
)


def test_harmony_final_channel_is_the_answer(harmony):
    prompt = think_ids(harmony, "<|start|> user <|message|> x <|end|> <|start|> assistant")
    assert not harmony.has_thinking  # mlx-lm does not know harmony
    assert initial_state(harmony, prompt) == "header"
    assert split_reasoning(harmony, HARMONY_OUTPUT, prompt) == ("y x", "x y z ")
    assert split_reasoning(harmony, "<|channel|> final <|message|> x", prompt) == ("x", "")
    # A prompt that already opened the final channel: the output is the answer.
    opened = prompt + think_ids(harmony, "<|channel|> final <|message|>")
    assert initial_state(harmony, opened) == "normal"
    assert split_reasoning(harmony, "x y", opened) == ("x y", None)
    assert split_reasoning(harmony, "x y", ()) == ("x y", None)


def test_harmony_token_by_token(harmony):
    prompt = think_ids(harmony, "<|start|> assistant")
    tokens = think_ids(harmony, HARMONY_OUTPUT)
    stream = OutputStream(harmony, max_tokens=-1, prompt=prompt)
    released = [stream.feed(token) for token in [*tokens, harmony.eos_token_id]]
    assert "".join(r.text for r in released) == "y x"
    assert "".join(r.reasoning for r in released) == "x y z "
    # Only the final channel's text is the answer's; its header belongs to the reasoning.
    parts = [r.part for r in released[: len(tokens)]]
    assert parts == ["reasoning"] * (len(tokens) - 2) + ["answer"] * 2


# -- the Python API --------------------------------------------------------------------------


def test_generate_keeps_the_reasoning_apart(think):
    model, tokenizer = think
    prompt = build_prompt(tokenizer, QUESTION)
    assert prompt[-1] == THINK_WORDS.index("<think>")
    result = generate(model, tokenizer, prompt, max_tokens=8, strategy="confident")
    final = generate(model, tokenizer, prompt, max_tokens=8)
    assert (final.text, final.reasoning, final.parts) == (ANSWER, REASONING, PARTS)
    assert final.tokens[2] == THINK_WORDS.index("</think>")
    assert final.layers_by_part() == {"reasoning": [3, 3, 3], "answer": [3] * 5}
    data = final.to_dict()
    assert (data["text"], data["reasoning"], data["parts"]) == (ANSWER, REASONING, PARTS)
    # Each token keeps its layer; the parts split them.
    by_part = result.layers_by_part()
    assert sorted(by_part["reasoning"] + by_part["answer"]) == sorted(result.layers)
    assert len(result.parts) == len(result.layers) == len(result.tokens)

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert [r.part for r in responses] == PARTS
    assert "".join(r.text for r in responses) == ANSWER
    assert "".join(r.reasoning for r in responses) == REASONING


def test_batch_rows_split_like_single_runs(think):
    model, tokenizer = think
    prompts = [build_prompt(tokenizer, QUESTION), build_prompt(tokenizer, "w12 w13 w14")]
    results, _ = batch_generate(model, tokenizer, prompts, max_tokens=8)
    assert (results[0].text, results[0].reasoning, results[0].parts) == (ANSWER, REASONING, PARTS)
    single = generate(model, tokenizer, prompts[1], max_tokens=8)
    assert (results[1].text, results[1].reasoning) == (single.text, single.reasoning)


def test_enable_thinking_false_reaches_the_template(think):
    model, tokenizer = think
    prompt = build_prompt(tokenizer, QUESTION, chat_template_kwargs=NO_THINKING)
    assert tokenizer.decode(prompt) == "<user> w9 w10 <assistant>"
    result = generate(model, tokenizer, prompt, max_tokens=8)
    assert (result.text, result.reasoning, result.parts) == (PLAIN_ANSWER, None, ["answer"] * 8)
    assert result.layers_by_part() == {"answer": result.layers}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ([1], "chat_template_kwargs must be an object"),
        ({"add_generation_prompt": False}, "may not set add_generation_prompt"),
    ],
)
def test_bad_template_kwargs_are_config_errors(think, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_prompt(think[1], QUESTION, chat_template_kwargs=kwargs)


# -- the command line ------------------------------------------------------------------------


def test_cli_json_and_text_keep_the_reasoning_apart(think_dir):
    from .test_cli import run, run_json

    model = str(think_dir)
    data = run_json("generate", "-m", model, "-p", QUESTION, "-n", "8")
    assert (data["text"], data["reasoning"], data["parts"]) == (ANSWER, REASONING, PARTS)
    result = run("generate", "-m", model, "-p", QUESTION, "-n", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{REASONING}\n\n{ANSWER}\n"
    assert "8 tokens (3 reasoning)" in result.stderr
    result = run("generate", "-m", model, "-p", QUESTION, "-n", "8", "--show-layers")
    assert "reasoning layers: final (3) ×3" in result.stderr
    assert "answer layers: final (3) ×5" in result.stderr

    compared = run_json("compare", "-m", model, "-p", QUESTION, "-n", "8", "-s", "final,fixed")
    first = compared["prompts"][0]["results"][0]
    assert (first["text"], first["reasoning"]) == (ANSWER, REASONING)
    table = run("compare", "-m", model, "-p", QUESTION, "-n", "8", "-s", "final")
    assert "w8 w11" in table.stdout and ANSWER in table.stdout
    assert "8 (3 reasoning)" in table.stdout


def test_cli_chat_template_kwargs(think_dir):
    from .test_cli import assert_one_line_error, run, run_json

    model = str(think_dir)
    off = json.dumps(NO_THINKING)
    data = run_json(
        "generate", "-m", model, "-p", QUESTION, "-n", "8", "--chat-template-kwargs", off
    )
    assert THINK_WORDS.index("<think>") not in data["prompt_tokens"]
    assert (data["text"], data["reasoning"]) == (PLAIN_ANSWER, None)
    compared = run_json(
        "compare", "-m", model, "-p", QUESTION, "-n", "8", "-s", "final",
        "--chat-template-kwargs", off,
    )  # fmt: skip
    assert compared["prompts"][0]["results"][0]["text"] == PLAIN_ANSWER
    for command in ("generate", "compare", "eval", "serve"):
        base = [command, "-m", model]
        if command == "eval":
            base += ["-t", "gsm8k", "-d", "missing.jsonl"]
        elif command != "serve":
            base += ["-p", QUESTION]
        bad = run(*base, "--chat-template-kwargs", "{enable_thinking: false}")
        assert_one_line_error(bad, 2, "--chat-template-kwargs", "not valid JSON")
        bad = run(*base, "--chat-template-kwargs", "[1]")
        assert_one_line_error(bad, 2, "--chat-template-kwargs", "give a JSON object")
    bad = run("generate", "-m", model, "-p", QUESTION, "--raw", "--chat-template-kwargs", off)
    assert_one_line_error(bad, 2, "--chat-template-kwargs needs the chat template")
    bad = run("generate", "-m", model, "-p", QUESTION, "--chat-template-kwargs", '{"tokenize": 1}')
    assert_one_line_error(bad, 2, "may not set tokenize")


# -- eval and report -------------------------------------------------------------------------


def test_eval_scores_the_answer_and_report_shows_both_parts(think_dir, think, tmp_path):
    from layerdecode.eval.records import read_results
    from layerdecode.eval.runner import plan_eval

    from .test_cli import run, run_json
    from .test_eval_run import ARITHMETIC

    out = tmp_path / "think.jsonl"
    lens = tmp_path / "lens1.yaml"
    lens.write_text("name: lens1\nstrategy: fixed\nparams: {layer: 1}\n")
    names = ["final", str(lens)]
    args = ["-t", "gsm8k", "-d", str(ARITHMETIC), "--limit", "2", "-n", "8", "-s", ",".join(names)]
    result = run("eval", "-m", str(think_dir), *args, "-o", str(out))
    assert result.exit_code == 0, result.output
    config, records = read_results(out)
    assert len(records) == 4 and "chat_template_kwargs" not in config.generation
    model, tokenizer = think
    plan = plan_eval(model="m", task="gsm8k", data=ARITHMETIC, strategies=["final"], limit=2)
    for record in records:
        item = next(i for i in plan.items if i.id == record.item_id)
        expected = generate(
            model, tokenizer, build_prompt(tokenizer, item.prompt), max_tokens=8,
            strategy=record.strategy,
        )  # fmt: skip
        assert (record.output, record.reasoning) == (expected.text, expected.reasoning)
        assert record.reasoning is not None and record.parts == expected.parts
        assert record.extracted == plan.task.score(expected.text, item).extracted

    report = run_json("report", str(out))
    parts = {(p["strategy"], p["part"]): p["tokens"] for p in report["parts"]}
    for name in names:
        mine = [r for r in records if r.strategy == name]
        assert parts[(name, "reasoning")] == sum(r.parts.count("reasoning") for r in mine)
        assert parts[(name, "answer")] == sum(r.parts.count("answer") for r in mine)
    lensed = [p for p in report["parts"] if p["strategy"] == str(lens) and p["tokens"]]
    assert lensed and all(p["share_non_final"] == 1.0 for p in lensed)  # layer 1 of 0..3
    final = [p for p in report["parts"] if p["strategy"] == "final"]
    assert all(p["share_non_final"] in (0.0, None) for p in final)
    text = run("report", str(out)).stdout
    assert "layers in the reasoning and in the answer" in text

    off = tmp_path / "off.jsonl"
    result = run(
        "eval", "-m", str(think_dir), *args, "-o", str(off),
        "--chat-template-kwargs", json.dumps(NO_THINKING),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config, records = read_results(off)
    assert len(records) == 4 and config.generation["chat_template_kwargs"] == NO_THINKING
    assert all(r.reasoning is None and r.parts == [] for r in records)
    assert run_json("report", str(off))["parts"] == []
    assert "layers in the reasoning" not in run("report", str(off)).stdout


def test_eval_extracts_the_answer_from_the_answer_text(monkeypatch, tmp_path):
    import layerdecode.batch
    from layerdecode.eval.records import read_results
    from layerdecode.eval.runner import plan_eval, run_eval

    from .test_cli import made_result
    from .test_eval_run import ARITHMETIC

    def fake(model, tokenizer, prompts, *, on_result, **kwargs):
        for index, prompt in enumerate(prompts):
            result = made_result(
                [5, 6, 7],
                [3, 3, 3],
                text="no idea",
                prompt_tokens=list(prompt),
                finish_reason="stop",
                reasoning="The answer is 24.",
                parts=["reasoning", "reasoning", "answer"],
            )
            on_result(index, result)

    monkeypatch.setattr(layerdecode.batch, "batch_generate", fake)
    plan = plan_eval(model="m", task="gsm8k", data=ARITHMETIC, strategies=["final"], limit=1)
    run_eval(None, tiny_tokenizer(), plan, tmp_path / "r.jsonl")
    [record] = read_results(tmp_path / "r.jsonl")[1]
    assert (record.output, record.reasoning) == ("no idea", "The answer is 24.")
    assert (record.extracted, record.correct) == (None, False)


# -- the server ------------------------------------------------------------------------------


@pytest.mark.slow  # a server process
def test_server_answers_with_reasoning_apart(think_dir, think):
    from .test_serve import Server

    off = json.dumps(NO_THINKING)
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    chat = [{"role": "user", "content": QUESTION}]
    with Server(think_dir, "--chat-template-kwargs", off) as server:
        client = server.client()
        model = client.models.list().data[0].id

        # The server's default turns thinking off; a request turns it back on.
        plain = client.chat.completions.create(model=model, messages=chat, max_tokens=8)
        message = plain.choices[0].message
        assert message.content == PLAIN_ANSWER
        assert getattr(message, "reasoning", None) is None
        assert plain.usage.prompt_tokens == 4

        thought = client.chat.completions.create(
            model=model, messages=chat, max_tokens=8, extra_body=on
        )
        message = thought.choices[0].message
        assert (message.content, message.reasoning) == (ANSWER, REASONING)
        assert thought.usage.prompt_tokens == 5 and thought.usage.completion_tokens == 8
        assert thought.choices[0].layerdecode["parts"] == PARTS

        chunks = list(
            client.chat.completions.create(
                model=model, messages=chat, max_tokens=8, stream=True, extra_body=on
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == ANSWER
        assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == REASONING

        raw = "<user> w9 w10 <assistant> <think>"
        completion = client.completions.create(model=model, prompt=raw, max_tokens=8)
        expected = generate(*think, raw, max_tokens=8)  # BOS first: not the chat's output
        assert expected.reasoning
        assert completion.choices[0].text == expected.text
        assert completion.choices[0].reasoning == expected.reasoning

        for bad, message in [
            ([1], "Invalid field 'chat_template_kwargs'"),
            ("yes", "Invalid field 'chat_template_kwargs'"),
            ({"tokenize": True}, "may not set tokenize"),
        ]:
            status, body, _ = server.post(
                "/v1/chat/completions",
                {"messages": chat, "max_tokens": 2, "chat_template_kwargs": bad},
            )
            assert status == 400, body
            assert body["error"]["param"] == "chat_template_kwargs"
            assert message in body["error"]["message"]
            assert body["error"]["type"] == "invalid_request_error"


# -- lm-eval ---------------------------------------------------------------------------------


def test_lm_eval_generate_until_returns_the_answer(think_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from layerdecode.harness import LayerdecodeLM

    lm = LayerdecodeLM(model=str(think_dir))
    context = lm.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert context == "<user> w9 w10 <assistant> <think> "
    request = Instance("generate_until", {}, (context, {"until": ["zzz"], "max_gen_toks": 8}), 0)
    assert lm.generate_until([request]) == [ANSWER]
