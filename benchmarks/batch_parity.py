"""Do batched rows equal single-prompt runs? mlx-lm's own batching beside layerdecode's.

    python benchmarks/batch_parity.py [--archs llama,qwen3,gemma3_text,mixtral,phi3]

On the prompts of ``tests/test_batch.py`` (lengths 1, 3, 17, 40, 8; 10 greedy tokens), for
each tiny architecture: how many rows of mlx-lm's ``BatchGenerator`` differ from mlx-lm's
single-prompt ``generate_step``, and how many rows of layerdecode's batch (``final``)
differ from its single runs. Where both batch paths differ in the same way, the cause is
float rounding of batched kernels, not layerdecode.
"""

from __future__ import annotations

import argparse
import random

LENGTHS = (1, 3, 17, 40, 8)
TOKENS = 10


def prompts_of_lengths(*lengths, seed=0):
    rng = random.Random(seed)  # as tests/test_batch.py draws them
    return [[rng.randrange(1, 200) for _ in range(n)] for n in lengths]


def mlx_single(model, prompt):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=TOKENS)
    return [int(token) for token, _ in steps]


def mlx_batch(model, prompts):
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=TOKENS)
    uids = generator.insert(prompts)
    rows = {uid: [] for uid in uids}
    while any(len(r) < TOKENS for r in rows.values()):
        for response in generator.next_generated():
            rows[response.uid].append(response.token)
    generator.close()
    return [rows[uid] for uid in uids]


def ours_single(model, prompt):
    import mlx.core as mx

    from layerdecode.generation import generate_step
    from layerdecode.registry import get_strategy

    steps = generate_step(mx.array(prompt), model, get_strategy("final"), max_tokens=TOKENS)
    return [s.token for s in steps]


def ours_batch(model, prompts):
    from layerdecode.batch import batch_generate_step
    from layerdecode.registry import get_strategy

    rows = [[] for _ in prompts]
    for step in batch_generate_step(prompts, model, get_strategy("final"), max_tokens=TOKENS):
        for r in step:
            rows[r.row].append(r.token)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama,qwen3,gemma3_text,mixtral,phi3")
    args = parser.parse_args()

    import mlx.core as mx

    from layerdecode.testing import tiny_model

    print(f"device: {mx.default_device()}  prompt lengths {LENGTHS}  greedy tokens {TOKENS}")
    prompts = prompts_of_lengths(*LENGTHS)
    for arch in args.archs.split(","):
        model = tiny_model(arch)
        mlx_rows = mlx_batch(model, prompts)
        mlx_singles = [mlx_single(model, p) for p in prompts]
        our_rows = ours_batch(model, prompts)
        our_singles = [ours_single(model, p) for p in prompts]
        mlx_bad = [i for i in range(len(prompts)) if mlx_rows[i] != mlx_singles[i]]
        our_bad = [i for i in range(len(prompts)) if our_rows[i] != our_singles[i]]
        singles = sum(a == b for a, b in zip(mlx_singles, our_singles, strict=True))
        batches = sum(a == b for a, b in zip(mlx_rows, our_rows, strict=True))
        print(
            f"{arch:12} rows != single runs: mlx-lm {mlx_bad or 'none'}, "
            f"layerdecode {our_bad or 'none'}; equal between the two: singles "
            f"{singles}/{len(prompts)}, batch rows {batches}/{len(prompts)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
