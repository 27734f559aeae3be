"""One rank of an lm-eval job, for tests/test_lm_eval_distributed.py.

``PYTHON lm_eval_ranks.py requests MODEL_DIR`` scores and generates a fixed set of requests
through the ``layerdecode`` lm-eval model and prints one JSON line with this rank and what
each of the three request kinds returned. ``PYTHON lm_eval_ranks.py cli ARGS...`` runs
``layerdecode ARGS...`` with lm-eval indexing only the ``--include_path`` tasks; the rank
named by ``$LM_EVAL_DIE_ON_RANK`` exits at once when handed its first generation, as a
crashed machine would.
"""

from __future__ import annotations

import json
import os
import sys

CONTEXTS = ["w7 w8 w9 w10", "w30 w31", "w12 w13 w14 w15 w16 w17"]
LOGLIKELIHOOD = [
    (CONTEXTS[0], " w11"),
    (CONTEXTS[1], " w32 w33 w34"),
    (CONTEXTS[0], " w20 w30"),
    (CONTEXTS[2], " w18"),
    (CONTEXTS[1], " w7"),
]
ROLLING = [("w7 w8 w9 w10 w11 w12",), ("w40 w41",), ("w3 w4 w5 w6",)]
GREEDY = {"until": ["w50"], "max_gen_toks": 6, "do_sample": False}
GENERATE = [
    (CONTEXTS[0], GREEDY),
    (CONTEXTS[1], {"until": ["zzz"], "max_gen_toks": 4}),
    (CONTEXTS[2], GREEDY),
    (CONTEXTS[1], GREEDY),
]


def requests(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def run(model_dir: str) -> dict:
    from layerdecode.blas import blas_status
    from layerdecode.harness import LayerdecodeLM

    lm = LayerdecodeLM(model=model_dir, batch_size=2, strategy="confident", window=3)
    return {
        "blas": blas_status(),
        "rank": lm.group.rank,
        "size": lm.group.size,
        "lm_eval_rank": [lm.rank, lm.world_size],
        "loglikelihood": lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD)),
        "rolling": lm.loglikelihood_rolling(requests("loglikelihood_rolling", ROLLING)),
        "generate": lm.generate_until(requests("generate_until", GENERATE)),
        "counts": lm.generation_counts,
    }


def cli(args: list[str]) -> None:
    from functools import partialmethod

    from lm_eval.tasks import TaskManager

    from layerdecode.cli import cli as command
    from layerdecode.harness import LayerdecodeLM

    # Index only --include_path: lm-eval's thousands of built-in tasks take seconds to scan.
    TaskManager.__init__ = partialmethod(TaskManager.__init__, include_defaults=False)
    if os.environ.get("LM_EVAL_DIE_ON_RANK") == os.environ.get("MLX_RANK"):
        LayerdecodeLM._generate = lambda *_: os._exit(3)
    command(args, prog_name="layerdecode")


if __name__ == "__main__":
    if sys.argv[1] == "requests":
        print(json.dumps(run(sys.argv[2])), flush=True)
    else:
        cli(sys.argv[2:])
