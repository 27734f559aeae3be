"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# --- real models (layerdecode.loading / manifests) ------------------------------------------
# The default model is fetched once into the persistent cache ($LAYERDECODE_HOME or the
# platform's user cache), so later test runs reuse it.


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model, SmolLM2-135M-Instruct, in the default dtype."""
    from layerdecode.loading import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2):
    """Path of the cached, verified SmolLM2 GGUF file the ``smollm2`` fixture came from."""
    from layerdecode.manifests import cache_dir

    return cache_dir() / "models" / "smollm2-135m-instruct" / "model.gguf"


# --- end of real models -------------------------------------------------------------------
