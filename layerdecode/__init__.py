"""layerdecode: decode each token from the decoder layer a pluggable strategy picks.

The public API. Names are imported on first use, so ``import layerdecode`` (and the CLI's
``--help``) does no MLX work.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "layerdecode.loading",
    "generate": "layerdecode.generation",
    "stream_generate": "layerdecode.generation",
    "generate_step": "layerdecode.generation",
    "GenerationResult": "layerdecode.generation",
    "LayerResponse": "layerdecode.generation",
    "batch_generate": "layerdecode.batch",
    "batch_generate_step": "layerdecode.batch",
    "BatchStats": "layerdecode.batch",
    "register_strategy": "layerdecode.registry",
    "get_strategy": "layerdecode.registry",
    "list_strategies": "layerdecode.registry",
    "resolve_strategy": "layerdecode.config",
    "list_presets": "layerdecode.config",
    "read_preset": "layerdecode.config",
    "Strategy": "layerdecode.strategy",
    "StrategyParams": "layerdecode.strategy",
    "Decision": "layerdecode.strategy",
    "ModelFacts": "layerdecode.strategy",
    "LayerView": "layerdecode.view",
    "Exit": "layerdecode.view",
    "EMBEDDINGS": "layerdecode.view",
    "get_adapter": "layerdecode.adapters",
    "evaluate": "layerdecode.eval.runner",
    "LayerdecodeError": "layerdecode.errors",
    "ConfigError": "layerdecode.errors",
    "ModelError": "layerdecode.errors",
    "UnsupportedModelError": "layerdecode.errors",
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
