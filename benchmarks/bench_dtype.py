"""Decode speed of the default model stored quantised, as float32 and as bfloat16.

Run: python benchmarks/bench_dtype.py [--tokens 64] [--model smollm2-135m-instruct]
On Linux, an installed OpenBLAS speeds up MLX's float32 GEMM a lot; importing layerdecode
first loads it (LAYERDECODE_BLAS=off to compare without).
"""

from __future__ import annotations

import argparse
import time

# Imported before anything loads mlx.core: on Linux it loads an installed system BLAS.
import layerdecode  # noqa: F401

PROMPT = "Write a short story about a lighthouse keeper."


def measure(model_name: str, dtype: str, tokens: int) -> tuple[float, float, float]:
    """(load seconds, prompt tokens/s, decode tokens/s) with mlx_lm.stream_generate."""
    from mlx_lm import stream_generate

    from layerdecode.loading import load

    start = time.perf_counter()
    model, tokenizer = load(model_name, dtype=dtype)
    loaded = time.perf_counter() - start
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=4):  # warm up
        pass
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=tokens))
    return loaded, responses[-1].prompt_tps, responses[-1].generation_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtypes", default="quantized,float32,bfloat16")
    args = parser.parse_args()

    import mlx.core as mx

    print(f"{args.model}, {args.tokens} tokens, device {mx.default_device()}")
    print(f"{'dtype':<10} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13}")
    for dtype in args.dtypes.split(","):
        loaded, prompt_tps, decode_tps = measure(args.model, dtype, args.tokens)
        print(f"{dtype:<10} {loaded:>7.2f} {prompt_tps:>13.1f} {decode_tps:>13.1f}")


if __name__ == "__main__":
    main()
