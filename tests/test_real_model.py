"""The core loop and batching on the real default model, SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
from mlx_lm.generate import generate as mlx_generate
from mlx_lm.generate import generate_step as mlx_generate_step

import layerdecode
from layerdecode.batch import batch_generate

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France? Answer briefly.",
    "Tom has 3 apples and buys 5 more. He gives 2 to his sister. How many apples does he "
    "have now? Think step by step, and end with 'The answer is N.'",
    "Hi",
]


def chat(tokenizer, question):
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_final_is_token_identical_to_mlx_lm(smollm2):
    model, tokenizer = smollm2
    for question in QUESTIONS[:2]:
        prompt = chat(tokenizer, question)
        result = layerdecode.generate(model, tokenizer, prompt, strategy="final", max_tokens=40)
        import mlx.core as mx

        expected = [
            t for t, _ in mlx_generate_step(mx.array(prompt), model, max_tokens=len(result.tokens))
        ]
        assert result.tokens == expected
        assert result.text == mlx_generate(model, tokenizer, prompt, max_tokens=40)
        assert set(result.layers) == {29}


def test_capital_of_france(smollm2):
    model, tokenizer = smollm2
    prompt = chat(tokenizer, QUESTIONS[0])
    assert layerdecode.generate(model, tokenizer, prompt).text == "The capital of France is Paris."


def test_confident_p0_is_final_and_p1_moves_layers(smollm2):
    model, tokenizer = smollm2
    prompt = chat(tokenizer, QUESTIONS[1])
    final = layerdecode.generate(model, tokenizer, prompt, max_tokens=32)
    p0 = layerdecode.generate(
        model, tokenizer, prompt, strategy="confident", params={"p": 0.0}, max_tokens=32
    )
    assert p0.tokens == final.tokens and set(p0.layers) == {29}
    confident = layerdecode.generate(model, tokenizer, prompt, strategy="confident", max_tokens=32)
    assert all(20 <= layer <= 29 for layer in confident.layers)
    assert confident.non_final_share > 0.2


@pytest.mark.parametrize(
    "strategy, params",
    [("final", {}), ("confident", {}), ("dola", {}), ("fixed", {"layer": -3}), ("sled", {})],
)
def test_batch_rows_equal_single_runs(smollm2, strategy, params):
    model, tokenizer = smollm2
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # very different lengths in one batch
    results, stats = batch_generate(
        model, tokenizer, prompts, strategy=strategy, params=params, max_tokens=20
    )
    for prompt, result in zip(prompts, results, strict=True):
        single = layerdecode.generate(
            model, tokenizer, prompt, strategy=strategy, params=params, max_tokens=20
        )
        assert result.tokens == single.tokens
        assert result.layers == single.layers
        assert result.extras == single.extras
        assert result.text == single.text
    assert stats.generation_tokens == sum(len(r.tokens) for r in results)
