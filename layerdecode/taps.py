"""Lazy capture of every decoder layer's output.

Each decoder layer object gets a subclass of its own class whose ``__call__`` records
the layer's output while a capture is open. The layer objects stay where they are, so
``parameters()``, ``load_weights`` and every attribute mlx-lm reads (``use_sliding``...)
see exactly the same tree; outside a capture the tapped call only forwards.

Captured hidden states are unevaluated ``mx.array`` graphs: recording them costs nothing,
and only those a strategy turns into logits are ever decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

_TAPPED_CLASSES: dict[type, type] = {}


class Capture:
    """Hidden states recorded during one forward pass.

    Attributes:
        embeddings: input of the first decoder layer (the scaled token embeddings).
        outputs: output of each decoder layer, by 0-based index.
    """

    __slots__ = ("embeddings", "outputs")

    def __init__(self, num_layers: int) -> None:
        self.embeddings = None
        self.outputs: list[Any] = [None] * num_layers


class _TapState:
    __slots__ = ("index", "capture", "hidden_of")

    def __init__(self, index: int) -> None:
        self.index = index
        self.capture: Capture | None = None
        self.hidden_of: Callable[[Any], Any] | None = None


def _first_input(kwargs: dict[str, Any]) -> tuple:
    for name in ("x", "hidden_states", "inputs", "h"):
        if name in kwargs:
            return (kwargs[name],)
    return tuple(kwargs.values())[:1]


def first_output(out: Any) -> Any:
    """The hidden state in what a decoder layer returns: the array, or a tuple's first item."""
    return out[0] if isinstance(out, tuple) else out


def _tapped_class(cls: type) -> type:
    tapped = _TAPPED_CLASSES.get(cls)
    if tapped is not None:
        return tapped

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        state = self.__dict__.get("_layerdecode_tap")
        capture = state.capture if state is not None else None
        if capture is not None:
            hidden_of = state.hidden_of or first_output
            if state.index == 0:
                # The first layer's positional inputs read as a layer's output would be.
                capture.embeddings = hidden_of(tuple(args) if args else _first_input(kwargs))
            capture.outputs[state.index] = hidden_of(out)
        return out

    tapped = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    tapped._layerdecode_original = cls
    _TAPPED_CLASSES[cls] = tapped
    return tapped


class LayerTaps:
    """Taps installed on a list of decoder layers; ``capture()`` records one forward pass.

    Installing is idempotent (a layer already tapped keeps its tap) and reversible:
    :meth:`remove` gives every layer its own class back; used as a context manager, the
    handle removes on exit the taps it installed itself.
    """

    def __init__(self, layers: list, hidden_of: Callable[[Any], Any] | None = None) -> None:
        self.layers = layers
        self._states: list[_TapState] = []
        self._installed: list = []
        for index, layer in enumerate(layers):
            state = layer.__dict__.get("_layerdecode_tap")
            if state is None:
                self._installed.append(layer)
                cls = type(layer)
                layer.__class__ = _tapped_class(cls)
                state = _TapState(index)
                # A plain attribute: mlx.nn.Module keeps only arrays, lists, dicts and
                # modules in its parameter tree, so the tap state stays invisible to it.
                object.__setattr__(layer, "_layerdecode_tap", state)
            state.index = index
            state.hidden_of = hidden_of
            self._states.append(state)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextmanager
    def capture(self):
        """Record the hidden states of the forward passes run inside the ``with`` block."""
        capture = Capture(len(self.layers))
        for state in self._states:
            state.capture = capture
        try:
            yield capture
        finally:
            for state in self._states:
                state.capture = None

    def remove(self) -> None:
        """Give every layer its original class back."""
        _untap(self.layers)
        self._states = []

    def __enter__(self) -> LayerTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        _untap(self._installed)
        self._installed = []


def _untap(layers: list) -> None:
    for layer in layers:
        if layer.__dict__.pop("_layerdecode_tap", None) is not None:
            layer.__class__ = type(layer)._layerdecode_original


def is_tapped(layer: Any) -> bool:
    """Whether ``layer`` carries a layerdecode tap."""
    return "_layerdecode_tap" in layer.__dict__


def install_taps(layers: list, hidden_of: Callable[[Any], Any] | None = None) -> LayerTaps:
    """Tap ``layers`` (idempotent: layers already tapped keep their tap).

    ``hidden_of`` turns what a layer returns into the hidden state to record (by default the
    returned array, or the first item of a returned tuple).
    """
    return LayerTaps(layers, hidden_of)
