"""The server on the real default model: the openai client, strategies, 16 concurrent clients."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .test_serve import Server

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (dev extra)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

pytestmark = [pytest.mark.real_model, pytest.mark.cross_process]

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 3?",
    "Say hello in Spanish.",
    "Who wrote Hamlet?",
    "What do bees make?",
    "Name a planet.",
    "What is the opposite of hot?",
]
STRATEGIES = [
    ("final", None),
    ("confident", {"window": 8}),
    ("dola-low", None),
    ("fixed", {"layer": 24}),
]


@pytest.fixture(scope="module")
def server():
    with Server("smollm2-135m-instruct", "--max-tokens-limit", "256") as s:
        yield s


def ask(client, question, strategy, params, max_tokens=16):
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"strategy": strategy, "strategy_params": params},
    )
    return reply.choices[0]


def test_chat_completion_stream_logprobs_and_stop(server):
    client = server.client()
    answer = ask(client, "What is the capital of France? Answer in one word.", "final", None, 8)
    assert "Paris" in answer.message.content
    done = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=6
    )
    assert "Paris" in done.choices[0].text
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Count from 1 to 5."}],
        max_tokens=40,
        stream=True,
        stop=["4"],
        logprobs=True,
        top_logprobs=2,
        extra_body={"strategy": "confident", "strategy_params": {"window": 8}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "3" in text and "4" not in text and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].layerdecode["strategy"] == "confident"
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.content or [])]
    assert tokens and all(len(t.top_logprobs) == 2 for t in tokens)


def test_16_concurrent_clients_with_mixed_strategies_equal_single_runs(server, smollm2):
    from layerdecode import build_prompt, generate

    model, tokenizer = smollm2
    jobs = [(q, *STRATEGIES[i % len(STRATEGIES)]) for i, q in enumerate(QUESTIONS * 2)]
    client = server.client(timeout=300)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    for (question, strategy, params), answer in zip(jobs, answers, strict=True):
        ids = build_prompt(tokenizer, [{"role": "user", "content": question}])
        single = generate(model, tokenizer, ids, strategy=strategy, params=params, max_tokens=16)
        assert answer.message.content == single.text, (question, strategy)
        assert answer.layerdecode["layers"] == single.layers, (question, strategy)
