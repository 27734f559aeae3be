"""Tiny random-weight models for the tests: the ones of ``layerdecode.testing``.

Kept so that ``from .tiny_models import ARCHS, tiny_model`` still works; new tests import
``layerdecode.testing`` directly.
"""

from __future__ import annotations

from layerdecode.testing import TINY_ARCHITECTURES as ARCHS
from layerdecode.testing import tiny_model

__all__ = ["ARCHS", "tiny_model"]
