"""An optimised system BLAS for MLX's CPU matrix products on Linux.

The ``mlx[cpu]`` wheel for Linux links a bundled reference BLAS, whose float32 GEMM is
about 30x slower than OpenBLAS. When ``layerdecode`` is imported before ``mlx.core``, an
optimised BLAS found on the system is loaded into the process's global symbol scope, so
that ``libmlx.so``, loaded afterwards, resolves ``cblas_sgemm`` and friends to it (what
``LD_PRELOAD`` does, without hand work). Nothing is done on macOS (MLX uses Accelerate)
or when ``mlx.core`` is already imported.

``LAYERDECODE_BLAS`` chooses: ``auto`` (default: the first library found among
:data:`CANDIDATES`), ``off``, or the path of a BLAS library with the CBLAS interface.
:func:`blas_status` says what happened. This module must not import MLX.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

ENV = "LAYERDECODE_BLAS"

# Optimised BLAS libraries with the CBLAS interface, in the order they are tried
# (Debian/Ubuntu alternatives, then the usual names on Fedora, Arch, conda and pip).
CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/blis-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "{prefix}/lib/libopenblas.so.0",
)

_status = "not checked yet"
_loaded: str | None = None
_handle: ctypes.CDLL | None = None


def blas_status() -> str:
    """One line saying which BLAS MLX's CPU matrix products use, as far as layerdecode knows."""
    return _status


def loaded_blas() -> str | None:
    """Path of the BLAS library layerdecode loaded, or ``None``."""
    return _loaded


def candidates(arch: str | None = None) -> list[str]:
    """The candidate paths for this machine, most preferred first."""
    arch = arch or os.uname().machine
    prefix = sys.prefix
    paths = [c.format(arch=arch, prefix=prefix) for c in CANDIDATES]
    return paths


def find_blas() -> str | None:
    """The first optimised BLAS found on this machine, or ``None``."""
    for path in candidates():
        if os.path.exists(path):
            return path
    return None


def activate(setting: str | None = None) -> str:
    """Load an optimised BLAS before MLX (see the module docstring); return the status line.

    Called once when ``layerdecode`` is imported; ``setting`` defaults to
    ``$LAYERDECODE_BLAS`` (``auto``, ``off`` or a path).
    """
    global _status, _loaded, _handle
    if _loaded is not None:
        return _status
    value = (setting if setting is not None else os.environ.get(ENV, "auto")).strip() or "auto"
    if not sys.platform.startswith("linux"):
        _status = f"system BLAS: not used on {sys.platform} (MLX brings its own)"
    elif "blas" in os.environ.get("LD_PRELOAD", "").lower():
        _status = f"system BLAS: preloaded by LD_PRELOAD={os.environ['LD_PRELOAD']}"
    elif value.lower() == "off":
        _status = f"system BLAS: off ({ENV}=off); MLX uses the BLAS it was built with"
    elif "mlx.core" in sys.modules:
        _status = (
            "system BLAS: not applied, mlx.core was imported before layerdecode "
            "(import layerdecode first, or set LD_PRELOAD)"
        )
    else:
        path = find_blas() if value.lower() == "auto" else value
        if path is None:
            _status = (
                "system BLAS: none found (install OpenBLAS, e.g. apt install libopenblas0, "
                f"or set {ENV}=/path/to/libblas.so); MLX uses its bundled reference BLAS"
            )
        else:
            _status = _load(path, explicit=value.lower() != "auto")
    return _status


def _load(path: str, *, explicit: bool) -> str:
    global _loaded, _handle
    try:
        # Check privately first: only a library with the CBLAS interface MLX calls goes global.
        ctypes.CDLL(path).cblas_sgemm  # noqa: B018
        handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError) as e:
        message = (
            f"system BLAS: could not use {path} ({str(e).splitlines()[0]}); "
            f"set {ENV} to the path of a CBLAS library, or to off"
        )
        if explicit:
            warnings.warn(message, stacklevel=3)
        return message
    _handle, _loaded = handle, path
    return f"system BLAS: {path}"


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Best float32 GEMM speed of MLX's default device, in GFLOP/s (imports MLX)."""
    import time

    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best / 1e9
