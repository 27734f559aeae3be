"""Dtypes: one list, one check, one default, re-exported where callers used to find them."""

from __future__ import annotations

import ast
import inspect

import mlx.core as mx
import pytest

from layerdecode import dtypes, gguf, loading, manifests
from layerdecode.errors import ModelError


def test_check_dtype():
    assert dtypes.check_dtype(None) == dtypes.default_dtype()
    for name in dtypes.DTYPES:
        assert dtypes.check_dtype(name) == name
    with pytest.raises(ModelError, match=r"Unknown dtype 'int3'; choose one of float32, "):
        dtypes.check_dtype("int3")


@pytest.mark.skipif(mx.metal.is_available(), reason="the CPU default only")
def test_default_dtype_without_metal():
    assert dtypes.default_dtype() == "float32"


def test_old_names_are_the_same_objects():
    assert loading.DTYPES is gguf.DTYPES is dtypes.DTYPES
    assert loading.default_dtype is dtypes.default_dtype


def test_gguf_reads_quantized_by_default(tmp_path):
    from tests.gguf_files import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quant="Q8_0")
    assert "quantization" in gguf.read_gguf(path).config
    assert "quantization" not in gguf.read_gguf(path, dtype="float32").config
    with pytest.raises(ModelError, match="Unknown dtype"):
        gguf.read_gguf(path, dtype="int3")


def test_no_import_circle():
    """dtypes, gguf and manifests never import loading: imports run loading -> the others."""
    for module in (dtypes, gguf, manifests):
        names = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                names |= {f"{node.module or ''}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        assert not [n for n in names if "loading" in n.split(".")], module.__name__
