"""lm-evaluation-harness support: the ``layerdecode`` model for lm-eval.

Importing this package registers the model with lm-eval (it needs the ``lm-eval`` extra:
``pip install "layerdecode[lm-eval]"``)::

    import lm_eval
    import layerdecode.harness  # registers model "layerdecode"

    results = lm_eval.simple_evaluate(
        model="layerdecode",
        model_args="model=smollm2-135m-instruct,strategy=confident,window=8",
        tasks=["gsm8k"],
        limit=20,
    )
"""

from __future__ import annotations

from .args import HarnessArgs, parse_model_args
from .model import LayerdecodeLM

__all__ = ["HarnessArgs", "LayerdecodeLM", "parse_model_args"]
