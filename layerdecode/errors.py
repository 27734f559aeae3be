"""Errors that reach users. Each carries one line that says what is wrong and what to do.

Two helpers keep those lines alike everywhere: :func:`did_you_mean` for unknown names and
:func:`one_line_error` for schema validation errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class LayerdecodeError(Exception):
    """Base class of every error layerdecode raises on purpose (bad input, missing model...)."""


class ConfigError(LayerdecodeError, ValueError):
    """A strategy name, parameter, generation option or YAML preset is invalid."""


class ModelError(LayerdecodeError):
    """A model cannot be found, fetched, converted or loaded."""


class UnsupportedModelError(ModelError):
    """The model's architecture or tensor type is not supported."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` (or ``'x' or 'y'``) for the closest known names, else ``""``."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def one_line_error(
    error: ValidationError, where: str, *, noun: str = "key", show_input: bool = False
) -> str:
    """A pydantic validation error as one line: ``where: unknown key 'x'; y: must be ...``."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown {noun} '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing {noun} '{loc}'")
        else:
            got = f" (got {err['input']!r})" if show_input and "input" in err else ""
            parts.append(f"{loc}: {err['msg']}{got}")
    return f"{where}: " + "; ".join(parts)
