"""Decode speed of each strategy as a ratio to ``mlx_lm.generate``, in one run.

    python benchmarks/bench_decode.py [--model NAME | --random SHAPE] [--tokens 128]
        [--repeats 3] [--strategies final,confident-lazy,confident-eager,dola,sled]

Each round runs mlx-lm and every strategy once on the same prompt, in turn, so that
drifts in machine load hit all of them alike; the median over rounds is reported, with the
head products per token of confident's scans. ``--random qwen1.5b|llama8b|tiny`` times a
random-weight model of that real shape (see random_model.py) on a random prompt.
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


# name -> (label, strategy, params)
STRATEGIES = {
    "final": ("final", "final", {}),
    "confident": ("confident (window 10)", "confident", {"window": 10}),
    "confident-lazy": ("confident (lazy scan)", "confident", {"window": 10, "scan": "lazy"}),
    "confident-eager": ("confident (eager scan)", "confident", {"window": 10, "scan": "eager"}),
    "dola": ("dola (high)", "dola", {"layers": "high"}),
    "sled": ("sled (all layers)", "sled", {}),
}
DEFAULT_STRATEGIES = "final,confident-lazy,confident-eager,dola,sled"


def last(iterable):
    return collections.deque(iterable, maxlen=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default model)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random", default=None, help="random-weight model of this shape")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=", ".join(STRATEGIES))
    args = parser.parse_args()

    # layerdecode first: on Linux it loads an installed system BLAS before mlx.core does,
    # for mlx-lm's runs in this process as well.
    import layerdecode
    from layerdecode.blas import blas_status

    print(f"blas: {blas_status()}")
    import mlx.core as mx
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    from layerdecode.registry import get_strategy

    if args.random:
        from random_model import random_model, random_prompt

        model, tokenizer = random_model(args.random, args.dtype or "bfloat16")
        prompt = random_prompt(model.args.vocab_size, 64)
    else:
        model, tokenizer = layerdecode.load(args.model, dtype=args.dtype)
        messages = [{"role": "user", "content": PROMPT}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}: choose among {', '.join(STRATEGIES)}")
    strategies = {
        STRATEGIES[key][0]: (lambda key=key: get_strategy(STRATEGIES[key][1], **STRATEGIES[key][2]))
        for key in args.strategies.split(",")
    }
    heads: dict[str, str] = {}

    def run_mlx():
        mx.reset_peak_memory()
        r = last(mlx_stream_generate(model, tokenizer, prompt, max_tokens=args.tokens))
        return r.generation_tps, r.prompt_tps, r.generation_tokens, r.peak_memory

    def run_ours(name, make):
        mx.reset_peak_memory()
        strategy = make()
        r = last(
            layerdecode.stream_generate(
                model, tokenizer, prompt, strategy=strategy, max_tokens=args.tokens
            )
        )
        if hasattr(strategy, "stats"):  # confident: head rows decoded, and walked if lazy
            stats = strategy.stats
            walked = f"{stats.walked_per_token:9.2f}" if strategy.lazy else f"{'-':>9}"
            heads[name] = f" {stats.per_token:9.2f} {walked}"
        return r.generation_tps, r.prompt_tps, r.generation_tokens, r.peak_memory

    runners = {"mlx_lm.generate": run_mlx} | {
        name: (lambda name=name, make=make: run_ours(name, make))
        for name, make in strategies.items()
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
        f"model: {args.random or args.model or 'default'}  prompt tokens: {len(prompt)}  "
        f"max tokens: {args.tokens}  rounds: {args.repeats}  device: {mx.default_device()}"
    )
    print(
        f"{'':24} {'decode tok/s':>12} {'ratio':>7} {'prefill tok/s':>14} {'tokens':>7} "
        f"{'peak GB':>8} {'heads/tok':>9} {'walk/tok':>9}"
    )
    for name, rows in results.items():
        tps = statistics.median(r[0] for r in rows)
        prefill = statistics.median(r[1] for r in rows)
        tokens = rows[-1][2]
        peak = max(r[3] for r in rows)
        extra = heads.get(name, "")
        print(
            f"{name:24} {tps:12.2f} {tps / base:7.3f} {prefill:14.1f} {tokens:7d} {peak:8.3f}"
            + extra
        )
    print(f"total {elapsed:.0f} s")


if __name__ == "__main__":
    main()
