"""Decode speed of each strategy as a ratio to ``mlx_lm.generate``, in one run.

    python benchmarks/bench_decode.py [--model NAME] [--tokens 128] [--repeats 3]

Each round runs mlx-lm and every strategy once on the same prompt, in turn, so that
drifts in machine load hit all of them alike; the median over rounds is reported.
On Linux, preload OpenBLAS for meaningful float32 numbers (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

PROMPT = (
    "Write a detailed, step-by-step explanation of how a bicycle works, covering the "
    "frame, the wheels, the chain, the gears and the brakes."
)


def last(iterable):
    return collections.deque(iterable, maxlen=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default model)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    import layerdecode
    from layerdecode.registry import get_strategy

    model, tokenizer = layerdecode.load(args.model, dtype=args.dtype)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    strategies = {
        "final": lambda: get_strategy("final"),
        "confident (window 10)": lambda: get_strategy("confident", window=10),
        "dola (high)": lambda: get_strategy("dola", layers="high"),
        "sled (all layers)": lambda: get_strategy("sled"),
    }

    def run_mlx():
        mx.reset_peak_memory()
        r = last(mlx_stream_generate(model, tokenizer, prompt, max_tokens=args.tokens))
        return r.generation_tps, r.prompt_tps, r.generation_tokens, r.peak_memory

    def run_ours(make):
        mx.reset_peak_memory()
        r = last(
            layerdecode.stream_generate(
                model, tokenizer, prompt, strategy=make(), max_tokens=args.tokens
            )
        )
        return r.generation_tps, r.prompt_tps, r.generation_tokens, r.peak_memory

    runners = {"mlx_lm.generate": run_mlx} | {
        name: (lambda make=make: run_ours(make)) for name, make in strategies.items()
    }
    run_mlx()  # warm-up
    results: dict[str, list[tuple]] = {name: [] for name in runners}
    start = time.perf_counter()
    for _ in range(args.repeats):
        for name, runner in runners.items():
            results[name].append(runner())
    elapsed = time.perf_counter() - start

    base = statistics.median(r[0] for r in results["mlx_lm.generate"])
    print(
        f"model: {args.model or 'default'}  prompt tokens: {len(prompt)}  "
        f"max tokens: {args.tokens}  rounds: {args.repeats}  device: {mx.default_device()}"
    )
    print(
        f"{'':24} {'decode tok/s':>12} {'ratio':>7} {'prefill tok/s':>14} {'tokens':>7} "
        f"{'peak GB':>8}"
    )
    for name, rows in results.items():
        tps = statistics.median(r[0] for r in rows)
        prefill = statistics.median(r[1] for r in rows)
        tokens = rows[-1][2]
        peak = max(r[3] for r in rows)
        print(f"{name:24} {tps:12.2f} {tps / base:7.3f} {prefill:14.1f} {tokens:7d} {peak:8.3f}")
    print(f"total {elapsed:.0f} s")


if __name__ == "__main__":
    main()
