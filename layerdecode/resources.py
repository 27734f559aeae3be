"""Where the shipped YAML presets and model manifests live.

In a wheel they sit in ``layerdecode/_data``; in a source checkout they are the
top-level ``strategies/`` and ``models/`` folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """Folder of shipped YAML files of one kind: ``"strategies"`` or ``"models"``."""
    if kind not in ("strategies", "models"):
        raise ValueError(f"unknown data kind {kind!r}")
    installed = _PACKAGE_DIR / "_data" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / kind
