"""The example plugin in docs/examples/layerdecode-min-entropy, as the plugin tutorial builds it.

Most tests run whether or not the package is installed: when it is not, the module is loaded
from its source file and registered in-process with ``register_strategy``. The tests that
need the entry point (and the command line, in a subprocess) skip unless it is installed,
as CI does with ``pip install ./docs/examples/layerdecode-min-entropy``.

Each test names the block of docs/plugins.md it mirrors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import layerdecode
from layerdecode import registry
from layerdecode.config import read_preset
from layerdecode.errors import ConfigError
from layerdecode.registry import get_strategy, list_strategies, register_strategy

# test_docs.py takes its tokenizer from here.
from layerdecode.testing import select_on, tiny_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "layerdecode-min-entropy"
SOURCE = EXAMPLE / "src" / "layerdecode_min_entropy" / "__init__.py"
EXAMPLE_TESTS = EXAMPLE / "tests" / "test_min_entropy.py"
PRESET = EXAMPLE / "min-entropy-4.yaml"
MODULE = "layerdecode_min_entropy"

INSTALLED = importlib.util.find_spec(MODULE) is not None
needs_install = pytest.mark.skipif(
    not INSTALLED,
    reason="the example plugin is not installed; run "
    "'pip install ./docs/examples/layerdecode-min-entropy' to test its entry point",
)


def plugin_module():
    """The installed module, or else the example's source file loaded under its own name."""
    if INSTALLED or MODULE in sys.modules:
        return importlib.import_module(MODULE)
    spec = importlib.util.spec_from_file_location(MODULE, SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module


# slow: installed packages run in other processes
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_registry")]


@pytest.fixture
def min_entropy():
    """The strategy class, registered as 'min-entropy' (through its entry point if installed)."""
    cls = plugin_module().MinEntropyStrategy
    # Registering the class its entry point already registered is a no-op, not a clash.
    register_strategy("min-entropy")(cls)
    return cls


def np_entropy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return -(np.exp(lp) * lp).sum(-1)


# -- the tests ------------------------------------------------------------------------------


# Mirrors plugins.md, step 1 (the params block).
def test_params_are_validated(min_entropy):
    assert get_strategy("min-entropy").params.window == 8
    with pytest.raises(ConfigError) as err:
        get_strategy("min-entropy", window=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("Invalid params for strategy 'min-entropy': window:")
    assert "greater than or equal to 1" in message
    with pytest.raises(ConfigError, match="unknown parameter 'windw'"):
        get_strategy("min-entropy", windw=4)
    with pytest.raises(ConfigError, match="window"):
        get_strategy("min-entropy", window="4")  # strict: no silent coercion


# Mirrors plugins.md, step 3 (the in-process block: register_strategy, then generate).
def test_register_in_process_and_generate(min_entropy, tiny_llama):
    assert "min-entropy" in list_strategies()
    model, tokenizer = tiny_llama
    num_layers = len(model.model.layers)

    def run(**kwargs):
        return layerdecode.generate(
            model, tokenizer, [5, 17, 42, 8, 99, 23], max_tokens=12, **kwargs
        )

    result = run(strategy="min-entropy", params={"window": 4})
    assert result.strategy == {"name": "min-entropy", "params": {"window": 4}}
    assert len(result.layers) == len(result.tokens) > 0
    assert all(num_layers - 4 <= layer < num_layers for layer in result.layers)
    # window=1 leaves only the final layer: the model's own greedy output.
    own = run()
    only_final = run(strategy="min-entropy", params={"window": 1})
    assert only_final.tokens == own.tokens


# Mirrors plugins.md, step 5 (the preset block).
def test_preset_file_is_valid_and_usable(min_entropy, tiny_llama):
    preset = read_preset(PRESET)
    assert (preset.name, preset.strategy, preset.params) == (
        "min-entropy-4",
        "min-entropy",
        {"window": 4},
    )
    model, tokenizer = tiny_llama
    result = layerdecode.generate(model, tokenizer, [5, 17, 42], strategy=str(PRESET), max_tokens=6)
    assert result.strategy["params"] == {"window": 4}


# Mirrors plugins.md, step 4 (the pyproject.toml block).
@needs_install
def test_entry_point_lists_plugin():
    assert "min-entropy" in list_strategies()
    source = registry.strategy_registry().source("min-entropy")
    assert source == (
        "layerdecode_min_entropy:MinEntropyStrategy (entry point of layerdecode-min-entropy)"
    )


def _cli() -> list[str]:
    exe = shutil.which("layerdecode")
    return [exe] if exe else [sys.executable, "-m", "layerdecode.cli"]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        _cli() + args, capture_output=True, text=True, timeout=120, env=env, **kwargs
    )


# Mirrors plugins.md, step 4 (the install-and-check commands block).
@needs_install
def test_cli_lists_plugin():
    done = _run(["strategies", "list", "--json"])
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["min-entropy"]["kind"] == "plugin"
    assert "layerdecode-min-entropy" in rows["min-entropy"]["source"]
    done = _run(["strategies", "validate", str(PRESET)])
    assert done.returncode == 0, done.stderr
    assert "strategy 'min-entropy'" in done.stdout


# Mirrors plugins.md, step 5 (the generate-with-the-preset command block).
@needs_install
def test_cli_generates_with_preset(tiny_model_dir):
    if importlib.util.find_spec("layerdecode.loading") is None:
        pytest.skip("layerdecode.loading is not available, so the CLI cannot load a model")
    model_dir = tiny_model_dir
    done = _run(
        [
            "generate",
            "--model",
            str(model_dir),
            "--strategy",
            str(PRESET),
            "--prompt",
            "w7 w8 w9",
            "--raw",
            "--max-tokens",
            "6",
            "--json",
        ]
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["strategy"]["name"] == "min-entropy"
    assert data["strategy"]["preset"] == "min-entropy-4"
    assert all(layer >= data["num_layers"] - 4 for layer in data["layers"])


# Mirrors plugins.md, "Testing a strategy" (the example's own tests, on its source).
def test_example_package_tests_pass():
    # A fresh interpreter with the example's src/ first on the path, so the tests import the
    # source as it is now, not a copy installed earlier.
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE_TESTS)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLE,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "skipped" not in done.stdout
