"""Aggregate decode tokens/s of batched decoding, beside mlx-lm's own ``batch_generate``.

    python benchmarks/bench_batch.py [--model NAME] [--tokens 64] [--sizes 1,4,8,16]

For each batch size, mlx-lm's ``batch_generate`` and layerdecode's ``batch_generate`` with
``final`` and ``confident`` run on the same prompts, in turn; every row generates exactly
``--tokens`` tokens (end-of-sequence is ignored) so that all runs do the same work.
"""

from __future__ import annotations

import argparse
import time

QUESTIONS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the seasons on Earth?",
    "Describe the water cycle step by step.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Explain for a child.",
    "List the planets of the solar system and one fact about each.",
    "How do vaccines train the immune system?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sizes", default="1,4,8,16")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import batch_generate as mlx_batch_generate

    import layerdecode
    from layerdecode.batch import batch_generate

    model, tokenizer = layerdecode.load(args.model, dtype=args.dtype)
    # Fixed-length runs: no row stops early, in either implementation.
    tokenizer._eos_token_ids = set()
    sizes = [int(s) for s in args.sizes.split(",")]

    def prompts(n):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                add_generation_prompt=True,
            )
            for i in range(n)
        ]

    def run_mlx(batch):
        mx.reset_peak_memory()
        response = mlx_batch_generate(model, tokenizer, batch, max_tokens=args.tokens)
        return response.stats.generation_tps, mx.get_peak_memory() / 1e9

    def run_ours(batch, strategy):
        mx.reset_peak_memory()
        _, stats = batch_generate(
            model, tokenizer, batch, strategy=strategy, max_tokens=args.tokens
        )
        return stats.generation_tps, stats.peak_memory_gb

    run_mlx(prompts(2))  # warm-up
    print(
        f"model: {args.model or 'default'}  new tokens per row: {args.tokens}  "
        f"device: {mx.default_device()}"
    )
    print(
        f"{'batch':>5} {'mlx-lm tok/s':>13} {'final tok/s':>12} {'ratio':>6} "
        f"{'confident tok/s':>16} {'vs final':>9} {'peak GB (mlx/final/conf)':>26}"
    )
    start = time.perf_counter()
    for size in sizes:
        batch = prompts(size)
        mlx_tps, mlx_peak = run_mlx(batch)
        final_tps, final_peak = run_ours(batch, "final")
        conf_tps, conf_peak = run_ours(batch, "confident")
        print(
            f"{size:5d} {mlx_tps:13.1f} {final_tps:12.1f} {final_tps / mlx_tps:6.3f} "
            f"{conf_tps:16.1f} {conf_tps / final_tps:9.3f} "
            f"{mlx_peak:8.3f}/{final_peak:.3f}/{conf_peak:.3f}"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
