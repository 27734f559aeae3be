"""Lazy capture of every decoder layer's output.

Each decoder layer object gets a subclass of its own class whose ``__call__`` records
the layer's output while a capture is open. The layer objects stay where they are, so
``parameters()``, ``load_weights`` and every attribute mlx-lm reads (``use_sliding``...)
see exactly the same tree; outside a capture the tapped call only forwards.

Captured hidden states are unevaluated ``mx.array`` graphs: recording them costs nothing,
and only those a strategy turns into logits are ever decoded.
"""

from __future__ import annotations

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
    __slots__ = ("index", "capture")

    def __init__(self, index: int) -> None:
        self.index = index
        self.capture: Capture | None = None


def _tapped_class(cls: type) -> type:
    tapped = _TAPPED_CLASSES.get(cls)
    if tapped is not None:
        return tapped

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        state = self.__dict__.get("_layerdecode_tap")
        capture = state.capture if state is not None else None
        if capture is not None:
            if state.index == 0:
                capture.embeddings = args[0] if args else kwargs.get("x")
            capture.outputs[state.index] = out[0] if isinstance(out, tuple) else out
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

    def __init__(self, layers: list) -> None:
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


def install_taps(layers: list) -> LayerTaps:
    """Tap ``layers`` (idempotent: layers already tapped keep their tap)."""
    return LayerTaps(layers)
