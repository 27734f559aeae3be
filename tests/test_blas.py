"""The system BLAS loaded for MLX on Linux, checked in fresh interpreters (LD_PRELOAD unset).

Which library MLX's ``cblas_sgemm`` resolves to is read from the dynamic linker itself: the
symbol as the process's global scope sees it (which ``libmlx.so``, loaded afterwards, binds
to first), and the file ``dladdr`` says it lives in.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerdecode import blas

# slow: every test starts a Python process
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
]

FOUND = blas.find_blas()
needs_blas = pytest.mark.skipif(FOUND is None, reason="no optimised BLAS installed here")

PROBE = """
import ctypes, sys
{before}
import layerdecode
import mlx.core as mx
from layerdecode import blas

class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

scope = ctypes.CDLL(None)
try:
    address = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p)
    info = Info()
    scope.dladdr(address, ctypes.byref(info))
    sgemm = info.fname.decode()
except AttributeError:
    sgemm = "-"
a = mx.ones((64, 64))
assert (a @ a).sum().item() == 64 ** 3
print(sgemm)
print(blas.blas_status())
"""


def probe(setting: str | None, before: str = "") -> tuple[str, str, str]:
    """(file of the global cblas_sgemm or '-', status line, stderr) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV)}
    if setting is not None:
        env[blas.ENV] = setting
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    sgemm, status = done.stdout.strip().splitlines()[-2:]
    return sgemm, status, done.stderr


@needs_blas
def test_auto_loads_the_system_blas_before_mlx():
    sgemm, status, _ = probe(None)
    assert os.path.realpath(sgemm) == os.path.realpath(FOUND)
    assert status == f"system BLAS: {FOUND}"


@needs_blas
def test_an_explicit_path_is_used():
    sgemm, status, _ = probe(FOUND)
    assert os.path.realpath(sgemm) == os.path.realpath(FOUND)


@needs_blas
def test_off_leaves_mlx_its_own_blas():
    sgemm, status, _ = probe("off")
    assert os.path.realpath(sgemm) != os.path.realpath(FOUND)
    assert "off" in status


@needs_blas
def test_nothing_is_done_when_mlx_came_first():
    sgemm, status, _ = probe(None, before="import mlx.core")
    assert os.path.realpath(sgemm) != os.path.realpath(FOUND)
    assert "mlx.core was imported before layerdecode" in status


def test_a_bad_path_warns_in_one_line():
    sgemm, status, stderr = probe("/nonexistent/libblas.so")
    assert sgemm == "-" or "nonexistent" not in sgemm
    assert status.startswith("system BLAS: could not use /nonexistent/libblas.so")
    assert f"set {blas.ENV}" in stderr


def test_no_effect_outside_linux(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(blas, "_status", "")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas.activate("auto") == "system BLAS: not used on darwin (MLX brings its own)"
    assert blas.loaded_blas() is None
