"""Errors that reach users. Each carries one line that says what is wrong and what to do."""

from __future__ import annotations


class LayerdecodeError(Exception):
    """Base class of every error layerdecode raises on purpose (bad input, missing model...)."""


class ConfigError(LayerdecodeError, ValueError):
    """A strategy name, parameter or YAML preset is invalid."""


class ModelError(LayerdecodeError):
    """A model cannot be found, fetched, converted or loaded."""


class UnsupportedModelError(ModelError):
    """The model's architecture or tensor type is not supported."""
