"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# layerdecode before any test module imports mlx.core: on Linux this loads the system BLAS
# into the test process exactly as into every subprocess the tests start (`layerdecode`,
# mlx.launch ranks, servers). Tests compare floats from both sides bit for bit, and two
# BLAS libraries round matrix products differently.
import layerdecode  # noqa: E402, F401  (imported for its side effect)
from layerdecode.blas import blas_status  # noqa: E402


def pytest_report_header(config):
    return blas_status()


def pytest_sessionstart(session):
    # Were mlx.core loaded first (by a plugin, say), this process would multiply matrices
    # with another library than the subprocesses it is compared with: fail now, with the
    # reason, rather than with floats that differ in the last bits later.
    if blas_status().startswith("system BLAS: not applied"):
        raise pytest.UsageError(f"tests/conftest.py: {blas_status()}")


def pytest_itemcollected(item):
    """Tests that compare processes or load a real model are ``slow`` too."""
    if item.get_closest_marker("cross_process") or item.get_closest_marker("real_model"):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests that compare this process with others (marked ``cross_process``) run after the
    rest, whatever order the others run in: what ran before them cannot hide behind them."""
    items.sort(key=lambda item: item.get_closest_marker("cross_process") is not None)


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


# --- tiny random-weight models and a clean registry (layerdecode.testing) ------------------


@pytest.fixture
def fresh_registry():
    """An empty strategy registry for the test; what the test registers is forgotten after it."""
    from layerdecode.testing import fresh_registry

    with fresh_registry():
        yield


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): the 6-layer tiny llama and the word-level tokenizer of its vocabulary."""
    from layerdecode.testing import tiny_model, tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny llama and its tokenizer saved once as an mlx-lm directory (do not modify it)."""
    from layerdecode.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
