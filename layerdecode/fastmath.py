"""``exp`` of shifted logits, fast and accurate on MLX's CPU backend.

Entropies and softmaxes over the vocabulary of several layers are where strategies spend
their time on the CPU, and there MLX's own ``exp`` is slow (about 20 ns per element in the
Linux wheel) and approximate (relative error ~4e-6). On the CPU layerdecode evaluates it
instead with the classic range reduction ``x = n ln 2 + r`` and a degree-6 polynomial for
``exp(r)`` (the Cephes ``expf`` coefficients; relative error below 1e-7), fused by
``mx.compile``. Other devices use ``mx.exp``.

:func:`log_softmax` is the one log-softmax of decoding (mlx-lm's ``generate_step`` form).
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split in two, so that n * ln 2 is exact in float32
_LN2_LO = -2.12194440e-4
_MIN = -87.3  # below this exp underflows float32; such inputs (and -inf) give 0
_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)


def _exp_poly(x: mx.array) -> mx.array:
    clipped = mx.maximum(x, _MIN)
    n = mx.floor(clipped * _LOG2E + 0.5)
    r = clipped - n * _LN2_HI - n * _LN2_LO
    p = _POLY[0]
    for c in _POLY[1:]:
        p = p * r + c
    y = p * (r * r) + r + 1.0
    scale = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)  # 2**n
    return mx.where(x < _MIN, 0.0, y * scale)


_cpu_exp = None


def _compiled_cpu_exp():
    global _cpu_exp
    if _cpu_exp is None:
        try:  # mx.compile on the CPU builds C++ at run time; fall back if it cannot
            compiled = mx.compile(_exp_poly)
            mx.eval(compiled(mx.array([-1.0, 0.0])))
            _cpu_exp = compiled
        except Exception:
            _cpu_exp = _exp_poly
    return _cpu_exp


def exp_shifted(x: mx.array) -> mx.array:
    """``exp(x)`` for float32 ``x <= 0`` (logits minus their maximum); ``-inf`` gives 0."""
    if mx.default_device() == mx.cpu:
        return _compiled_cpu_exp()(x)
    return mx.exp(x)


def softmax_and_log(x: mx.array) -> tuple[mx.array, mx.array]:
    """Probabilities and log-probabilities over the last axis, in float32, one exp per element."""
    shifted = x.astype(mx.float32)
    shifted = shifted - mx.max(shifted, axis=-1, keepdims=True)
    weights = exp_shifted(shifted)
    total = mx.sum(weights, axis=-1, keepdims=True)
    return weights / total, shifted - mx.log(total)


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis, ``x - logsumexp(x)``, as mlx-lm decodes them."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
