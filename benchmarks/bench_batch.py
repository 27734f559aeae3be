"""Aggregate decode tokens/s of batched decoding, beside mlx-lm's own ``batch_generate``.

    python benchmarks/bench_batch.py [--model NAME | --random SHAPE] [--tokens 64]
        [--sizes 1,4,8,16] [--scans auto] [--repeats 1]

For each batch size, mlx-lm's ``batch_generate`` and layerdecode's ``batch_generate`` with
``final`` and ``confident`` (once per ``--scans`` entry: auto, lazy, eager) run on the same
prompts, in turn; every row generates exactly ``--tokens`` tokens (end-of-sequence is
ignored) so that all runs do the same work. ``--random qwen1.5b|llama8b|tiny`` times a
random-weight model of that real shape (see random_model.py) on random prompts.
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
    parser.add_argument("--random", default=None, help="random-weight model of this shape")
    parser.add_argument("--scans", default="auto", help="confident scans to time, e.g. eager,lazy")
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved rounds; the best of each is shown"
    )
    args = parser.parse_args()

    # layerdecode first: on Linux it loads an installed system BLAS before mlx.core does,
    # for mlx-lm's runs in this process as well.
    import layerdecode
    from layerdecode.blas import blas_status

    print(f"blas: {blas_status()}")
    import mlx.core as mx
    from mlx_lm.generate import batch_generate as mlx_batch_generate

    from layerdecode.batch import batch_generate
    from layerdecode.registry import get_strategy

    if args.random:
        from random_model import random_model, random_prompt

        model, tokenizer = random_model(args.random, args.dtype or "bfloat16")
    else:
        model, tokenizer = layerdecode.load(args.model, dtype=args.dtype)
    # Fixed-length runs: no row stops early, in either implementation.
    tokenizer._eos_token_ids = set()
    sizes = [int(s) for s in args.sizes.split(",")]
    scans = args.scans.split(",")

    def prompts(n):
        if args.random:
            vocab = model.args.vocab_size
            return [random_prompt(vocab, 24 + 3 * i, seed=i) for i in range(n)]
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

    def run_confident(batch, scan):
        strategy = get_strategy("confident", scan=scan)
        tps, peak = run_ours(batch, strategy)
        return tps, peak, strategy.stats.per_token, strategy.stats.walked_per_token

    run_mlx(prompts(2))  # warm-up
    print(
        f"model: {args.random or args.model or 'default'}  new tokens per row: {args.tokens}  "
        f"device: {mx.default_device()}"
    )
    columns = "".join(
        f" {'confident ' + scan + ' tok/s':>22} {'vs final':>9} {'heads/tok':>9} {'walk/tok':>8}"
        for scan in scans
    )
    print(
        f"{'batch':>5} {'mlx-lm tok/s':>13} {'final tok/s':>12} {'ratio':>6}{columns} "
        f"{'peak GB (mlx/final/conf..)':>26}"
    )
    start = time.perf_counter()
    for size in sizes:
        batch = prompts(size)
        best: dict[str, tuple] = {}
        for _ in range(args.repeats):
            runs = {
                "mlx": lambda batch=batch: run_mlx(batch),
                "final": lambda batch=batch: run_ours(batch, "final"),
            }
            runs |= {
                scan: (lambda batch=batch, scan=scan: run_confident(batch, scan)) for scan in scans
            }
            for name, run in runs.items():
                result = run()
                if name not in best or result[0] > best[name][0]:
                    best[name] = result
        (mlx_tps, mlx_peak), (final_tps, final_peak) = best["mlx"], best["final"]
        line = f"{size:5d} {mlx_tps:13.1f} {final_tps:12.1f} {final_tps / mlx_tps:6.3f}"
        peaks = [mlx_peak, final_peak]
        for scan in scans:
            conf_tps, conf_peak, heads, walked = best[scan]
            walk = f"{walked:8.2f}" if walked else f"{'-':>8}"
            line += f" {conf_tps:22.1f} {conf_tps / final_tps:9.3f} {heads:9.2f} {walk}"
            peaks.append(conf_peak)
        print(f"{line} {'/'.join(f'{p:.3f}' for p in peaks):>26}", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
