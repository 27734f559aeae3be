"""One rank of a tensor-parallel generation, for tests/test_distributed.py.

Usage: ``mlx.launch -n 2 -- PYTHON tp_generate.py MODEL_DIR...``. Every rank loads its slice
of each model, runs each strategy greedily on the same prompt and prints one JSON line with
its rank and, per model, the rows of its first query projection and, per strategy, the
tokens and the layer each was decoded from.
"""

from __future__ import annotations

import json
import sys

import layerdecode
from layerdecode.distributed import init

PROMPT = "the cat sat on the mat and"
STRATEGIES = ("final", "confident", "dola")


def run(path: str, group) -> dict:
    model, tokenizer = layerdecode.load(path, group=group)
    results = {}
    for strategy in STRATEGIES:
        result = layerdecode.generate(model, tokenizer, PROMPT, strategy=strategy, max_tokens=12)
        results[strategy] = {"tokens": result.tokens, "layers": result.layers}
    rows = int(model.layers[0].self_attn.q_proj.weight.shape[0])  # halved when split in two
    return {"q_rows": rows, "results": results}


def main(paths: list[str]) -> dict:
    group = init("tensor")
    models = {path: run(path, group) for path in paths}
    return {"rank": group.rank, "size": group.size, "models": models}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
