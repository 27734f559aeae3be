"""The strategy protocol: what every exit-layer policy implements.

A strategy is created once from validated params, ``prepare``-d once per model (when the
number of layers is known) and asked to ``select`` at every step, for all the rows that use
it at once. One strategy object may serve many rows and many requests: what belongs to one
row (a random key, say) lives in the state :meth:`Strategy.new_state` makes, which the
engine keeps with the row and hands over as ``view.states``.

``select`` should build its result from vectorised ``mx`` ops only (no ``.item()``, no
``tolist()``, no Python branching on array values), so that the engine schedules step n+1
before step n is read. A strategy that must read values on the host sets
:attr:`Strategy.host_sync`; the engine then reads each step before it builds the next.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, ValidationError

from .adapters import Adapter
from .errors import ConfigError, one_line_error
from .view import Exit, LayerView


class StrategyParams(BaseModel):
    """Base class of every strategy's parameter schema: strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass
class Decision:
    """What a strategy returns for one step.

    Attributes:
        logits: ``(batch, vocab)`` logits to sample from (processors and sampler follow).
        layers: ``(batch,)`` integer 0-based decoder layer each row was decoded from.
        entropy: ``(batch,)`` entropy in nats of that layer's own distribution.
        extras: further ``(batch,)`` arrays to report per token (e.g. DoLa's premature layer).
        final: the final layer's logits ``(batch, vocab)`` as the strategy decoded them, if it
            did (the "changed" flag compares with the token they give); default: the view's.
        candidate_layers: the layers whose entropy the strategy read, for traces.
        candidate_entropy: ``(batch, len(candidate_layers))`` their entropies in nats, NaN
            where a row did not read that layer.
    """

    logits: mx.array
    layers: mx.array
    entropy: mx.array
    extras: dict[str, mx.array] = field(default_factory=dict)
    final: mx.array | None = None
    candidate_layers: tuple[int, ...] = ()
    candidate_entropy: mx.array | None = None


def format_validation_error(strategy: str, error: ValidationError) -> str:
    where = f"Invalid params for strategy '{strategy}'"
    return one_line_error(error, where, noun="parameter", show_input=True)


@dataclass(frozen=True)
class ModelFacts:
    """What a strategy may know about the model it decodes.

    Attributes:
        num_layers: number of decoder layers (the final one is ``num_layers - 1``).
        tied_embeddings: whether the output head is the tied input embedding matrix.
        model_type: the mlx-lm ``model_type``.
    """

    num_layers: int
    tied_embeddings: bool = False
    model_type: str = ""


def model_facts(adapter: Adapter) -> ModelFacts:
    """What a strategy may know of the model an adapter decodes."""
    return ModelFacts(adapter.num_layers, adapter.tied_embeddings, adapter.model_type)


class Strategy:
    """Base class of exit-layer strategies.

    Subclasses set ``name``, ``description`` and ``Params`` (a :class:`StrategyParams`
    subclass whose field descriptions document each parameter), and implement
    :meth:`exits` and :meth:`select`. ``prepare`` may be extended to check params against
    the model's depth and to reset per-generation state.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            raise ConfigError(format_validation_error(self.name, e)) from None
        self.model: ModelFacts | None = None

    @classmethod
    def describe_params(cls) -> list[dict[str, Any]]:
        """Each param as ``{"name", "type", "default", "description"}``, for help and docs."""
        from pydantic_core import PydanticUndefined

        rows = []
        for name, info in cls.Params.model_fields.items():
            default = info.default
            if default is PydanticUndefined:
                default = "(required)" if info.default_factory is None else info.default_factory()
            rows.append(
                {
                    "name": name,
                    "type": _type_name(info.annotation),
                    "default": default,
                    "description": info.description or "",
                }
            )
        return rows

    def resolved_params(self) -> dict[str, Any]:
        """The params with defaults filled in, as plain JSON-able values."""
        return self.params.model_dump(mode="json")

    def prepare(self, model: ModelFacts) -> None:
        """Bind to a model; called once per model. Check depth-dependent params here."""
        self.model = model

    @property
    def host_sync(self) -> bool:
        """Whether ``select`` reads array values on the host (default ``False``)."""
        return False

    def new_state(self, seed: int | None = None) -> Any:
        """The state of one new row, kept by the engine and passed back in ``view.states``.

        ``seed`` is the row's generation seed, when it has one (a strategy that draws at
        random should then draw from a key of its own). The default keeps no state.
        """
        return None

    def log_probs(self, view: LayerView) -> mx.array:
        """Log-probabilities ``(rows, vocab)`` of the distribution ``select`` decodes from.

        Scoring (the lm-eval model's log-likelihoods) asks for this. The default is the
        log-softmax of ``select``'s logits; a strategy that mixes layers by drawing states
        its mixture here.
        """
        import mlx.nn as nn

        # mlx-lm's log-softmax (shifted by the max first), so that scores equal mlx-lm's.
        return nn.log_softmax(self.select(view).logits.astype(mx.float32))

    def exits(self) -> Sequence[Exit]:
        """The exits ``select`` may read (decoded together, once per step)."""
        return ()

    def select(self, view: LayerView) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.resolved_params().items())
        return f"{type(self).__name__}({params})"


def _type_name(annotation: Any) -> str:
    """A short, readable name of a type annotation (``int | none``, ``'a' | 'b'``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def final_layer_decision(view: LayerView) -> Decision:
    """Decode every row from the model's own output."""
    final = view.final_layer
    return Decision(
        logits=view.final_logits,
        layers=mx.full((view.batch_size,), final, dtype=mx.int32),
        entropy=view.entropy(final),
    )
