"""layerdecode: decode each token from the decoder layer a pluggable strategy picks.

The public API. Names are imported on first use, so ``import layerdecode`` (and the CLI's
``--help``) does no MLX work.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Before anything imports mlx.core: an optimised system BLAS on Linux (layerdecode/blas.py).
import_module("layerdecode.blas").activate()

# The one place the version is written: the package metadata is built from this line.
__version__ = "0.1.0"

_EXPORTS = {
    "load": "layerdecode.loading",
    "GenerationOptions": "layerdecode.options",
    "build_prompt": "layerdecode.prompts",
    "Engine": "layerdecode.engine",
    "Plan": "layerdecode.events",
    "TokenEvent": "layerdecode.events",
    "generate": "layerdecode.generation",
    "stream_generate": "layerdecode.generation",
    "GenerationResult": "layerdecode.generation",
    "batch_generate": "layerdecode.batch",
    "register_strategy": "layerdecode.registry",
    "list_strategies": "layerdecode.registry",
    "resolve_strategy": "layerdecode.config",
    "Strategy": "layerdecode.strategy",
    "StrategyParams": "layerdecode.strategy",
    "Decision": "layerdecode.strategy",
    "ModelFacts": "layerdecode.strategy",
    "LayerView": "layerdecode.view",
    "Exit": "layerdecode.view",
    "entropy_of": "layerdecode.view",
    "logit_lens": "layerdecode.lens",
    "evaluate": "layerdecode.eval.runner",
    "LayerdecodeError": "layerdecode.errors",
    "ConfigError": "layerdecode.errors",
    "ModelError": "layerdecode.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layerdecode' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
