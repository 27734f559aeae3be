"""The dtypes a model's weights can be loaded in, and the default for this machine.

Loading, manifests and the GGUF importer all check a dtype here, so the list and its error
message exist once.
"""

from __future__ import annotations

from layerdecode.errors import ModelError

DTYPES = ("float32", "bfloat16", "float16", "quantized")


def default_dtype() -> str:
    """The fastest dtype here: quantised weights on Metal, float32 on the CPU.

    MLX's quantised matmul on the CPU is much slower than a float32 GEMM, while on Apple GPUs
    the quantised kernels win because decoding is bound by memory bandwidth.
    """
    import mlx.core as mx

    on_gpu = mx.default_device() == mx.gpu
    if on_gpu and mx.metal.is_available():
        return "quantized"
    return "float32"


def check_dtype(dtype: str | None) -> str:
    """``dtype`` itself if known, ``default_dtype()`` for None; else raise ``ModelError``."""
    if dtype is None:
        return default_dtype()
    if dtype not in DTYPES:
        raise ModelError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return dtype
