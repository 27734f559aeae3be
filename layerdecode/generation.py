"""Single-stream generation: ``generate_step`` -> ``stream_generate`` -> ``generate``.

It mirrors mlx-lm's three layers over :class:`~layerdecode.engine.Engine`, with one row:
:func:`generate_step` yields each token with the layer it came from; :func:`stream_generate`
adds text, stop sequences and timings; :func:`generate` collects a whole
:class:`GenerationResult`. Every layer yields :class:`~layerdecode.engine.TokenEvent` s.
Public entry points resolve the strategy and the options once; everything below them takes
only the resolved forms.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import ResolvedStrategy, resolve_strategy
from .engine import Engine, LogitsProcessor, Plan, Sampler, TokenEvent
from .errors import ConfigError
from .layerstats import TokenStats, layer_stats, token_stats
from .options import GenerationOptions
from .prompts import encode_prompt
from .reasoning import REASONING, layers_by_part
from .strategy import Strategy

# Keyword arguments of the step loops; every other keyword is a generation option.
STEP_KEYS = ("max_kv_size", "prompt_cache", "prefill_step_size", "prompt_progress_callback")


def generate_step(
    prompt: mx.array | Sequence[int],
    model: nn.Module,
    strategy: Strategy | ResolvedStrategy | str,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    stop_tokens: Sequence[int] = (),
    **kwargs: Any,
) -> Generator[TokenEvent, None, None]:
    """Yield generated tokens, each decoded from the layer ``strategy`` selects.

    Args:
        prompt: the prompt's token ids.
        model: an mlx-lm model.
        strategy: a strategy object (or a name or a resolved strategy).
        max_tokens: number of tokens to generate (-1: no limit).
        sampler: maps log-probabilities ``(1, vocab)`` to a token; greedy by default.
        logits_processors: mlx-lm logits processors, applied to the strategy's logits.
        stop_tokens: token ids that end the generation (the one that does is yielded).
        kwargs: as in mlx-lm: ``max_kv_size`` (a rotating cache of that size),
            ``prompt_cache`` (a cache from ``make_prompt_cache`` to fill and reuse),
            ``prefill_step_size`` (prompt tokens per forward pass, 2048) and
            ``prompt_progress_callback`` (called with (processed, total) prompt tokens).

    Yields:
        One :class:`~layerdecode.engine.TokenEvent` per token (without text).
    """
    unknown = sorted(set(kwargs) - set(STEP_KEYS))
    if unknown:
        raise ConfigError(f"generate_step does not take {', '.join(unknown)}.")
    if isinstance(prompt, mx.array) and prompt.ndim != 1:
        raise ConfigError(f"The prompt must be 1-D token ids, got shape {tuple(prompt.shape)}.")
    if max_tokens == 0:
        return iter(())
    plan = Plan(
        resolve_strategy(strategy),
        GenerationOptions(max_tokens=max_tokens),
        sampler=sampler,
        logits_processors=tuple(logits_processors or ()),
        stop_tokens=tuple(stop_tokens),
    )
    return _one_row(model, None, prompt, plan, kwargs)


def _one_row(
    model: nn.Module,
    tokenizer: Any,
    prompt: mx.array | Sequence[int],
    plan: Plan,
    step_kwargs: dict[str, Any],
) -> Generator[TokenEvent, None, None]:
    """The events of one row decoded alone (an empty prompt is refused by the engine)."""
    engine = Engine(
        model,
        tokenizer,
        prefill_step_size=step_kwargs.get("prefill_step_size", 2048),
        max_kv_size=step_kwargs.get("max_kv_size"),
    )
    engine.add(
        prompt.tolist() if isinstance(prompt, mx.array) else prompt,
        plan,
        key=0,
        prompt_cache=step_kwargs.get("prompt_cache"),
        progress=step_kwargs.get("prompt_progress_callback"),
    )
    return _events(engine)


def _events(engine: Engine) -> Generator[TokenEvent, None, None]:
    with wired_limit(engine.model, [generation_stream]):
        for events in engine.run():
            yield from events


def resolve_call(
    strategy: str | Strategy | ResolvedStrategy | None,
    params: dict[str, Any] | None,
    options: GenerationOptions | dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> tuple[ResolvedStrategy, GenerationOptions, dict[str, Any]]:
    """What a public entry point resolves once: strategy, options over the preset's, step args.

    ``kwargs`` holds generation options given as keywords (``temp=...``) and the step
    loops' arguments (:data:`STEP_KEYS`); an unknown keyword is a ``ConfigError``.
    """
    resolved = resolve_strategy(strategy, params)
    step_kwargs = {k: kwargs.pop(k) for k in STEP_KEYS if k in kwargs}
    chosen = GenerationOptions.build(options, **kwargs).over(resolved.generation)
    return resolved, chosen, step_kwargs


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    strategy: str | Strategy | ResolvedStrategy | None = "final",
    params: dict[str, Any] | None = None,
    options: GenerationOptions | dict[str, Any] | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    candidates: bool = False,
    **kwargs: Any,
) -> Generator[TokenEvent, None, None]:
    """Stream text decoded with ``strategy``; the last response carries the timings.

    Args:
        model, tokenizer: as returned by :func:`layerdecode.load` (or ``mlx_lm.load``).
        prompt: text (encoded as mlx-lm does) or token ids.
        strategy: a registered strategy name, a preset name, a YAML preset path or a
            :class:`~layerdecode.strategy.Strategy` object.
        params: strategy params (override the preset's).
        options: :class:`~layerdecode.options.GenerationOptions` (or a dict of them):
            ``temp``, ``top_p``, ``min_p``, ``top_k``, ``repetition_penalty``,
            ``repetition_context_size``, ``seed``, ``max_tokens`` (default: the preset's,
            else 256; -1: no limit) and ``stop`` sequences. Unset options fall back to the
            preset's generation defaults, then to greedy decoding.
        sampler, logits_processors: mlx-lm sampler and processors; an explicit sampler
            replaces the one the options make, processors run before the options' ones.
        candidates: report in each event the entropy of every layer the strategy read
            (``TokenEvent.candidates``; costs a read from the device per step).
        kwargs: generation options as keywords (``temp=0.7``, ``stop=["\\n\\n"]``) and
            :func:`generate_step`'s ``max_kv_size``, ``prompt_cache``,
            ``prefill_step_size``, ``prompt_progress_callback``.
    """
    resolved, chosen, step_kwargs = resolve_call(strategy, params, options, kwargs)
    tokenizer = _wrap(tokenizer)
    return stream_resolved(
        model,
        tokenizer,
        encode_prompt(tokenizer, prompt),
        resolved,
        chosen,
        sampler=sampler,
        logits_processors=logits_processors,
        candidates=candidates,
        **step_kwargs,
    )


def _wrap(tokenizer: Any) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def stream_resolved(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: mx.array | Sequence[int],
    resolved: ResolvedStrategy,
    options: GenerationOptions,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    candidates: bool = False,
    **step_kwargs: Any,
) -> Generator[TokenEvent, None, None]:
    """:func:`stream_generate` for a resolved strategy, options and encoded prompt.

    ``step_kwargs`` are :func:`generate_step`'s (``max_kv_size``, ``prompt_cache``...).
    """
    plan = Plan(
        resolved,
        options,
        sampler=sampler,
        logits_processors=tuple(logits_processors or ()),
        candidates=candidates,
    )
    return _one_row(model, tokenizer, prompt, plan, step_kwargs)


@dataclass
class GenerationResult:
    """A whole generation: text, tokens and, per token, the layer it came from.

    ``tokens``, ``layers``, ``entropies``, ``parts``, ``extras``, ``changed``,
    ``head_rows`` and ``candidates`` have one entry per generated token (the
    end-of-sequence token, which is not part of the text, is left out; the tokens that
    spelled a stop sequence are kept, while the text ends before it). ``changed`` says
    whether the token differs from the one the final layer alone would have given (None
    where that cannot be told: a caller's own sampler, whose draw cannot be replayed),
    ``head_rows`` how many vocabulary-head rows its step cost (the final layer's included),
    and ``candidates`` the entropy of every layer the strategy read for it (layer ->
    nats). ``text`` is the answer; a thinking model's reasoning is in ``reasoning`` (None
    when the output had none), and ``parts`` says of each token whether it belongs to the
    ``"reasoning"`` or the ``"answer"``.
    """

    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    layers: list[int]
    entropies: list[float]
    num_layers: int
    strategy: dict[str, Any]
    finish_reason: str
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    extras: dict[str, list[int]] = field(default_factory=dict)
    stop_sequence: str | None = None
    reasoning: str | None = None
    parts: list[str] = field(default_factory=list)
    changed: list[bool | None] = field(default_factory=list)
    head_rows: list[int] = field(default_factory=list)
    candidates: list[dict[int, float]] = field(default_factory=list)

    def layers_by_part(self) -> dict[str, list[int]]:
        """The layers of the reasoning's tokens and of the answer's (only the answer's when
        there was no reasoning)."""
        return layers_by_part(self.layers, self.parts if self.reasoning is not None else ())

    @property
    def non_final_share(self) -> float:
        """Share of tokens decoded from a layer below the final one."""
        return layer_stats(self.layers, self.num_layers - 1)[0] or 0.0

    @property
    def mean_depth(self) -> float:
        """Mean number of layers below the final one that tokens were decoded from."""
        return layer_stats(self.layers, self.num_layers - 1)[1] or 0.0

    def token_stats(self) -> TokenStats:
        """The per-token figures: non-final and changed shares, depths, extra head rows."""
        return token_stats(self.layers, self.num_layers - 1, self.changed, self.head_rows)

    @property
    def changed_share(self) -> float | None:
        """Share of tokens that differ from the final layer's token (None: not known)."""
        return self.token_stats().changed_share

    @property
    def extra_head_rows(self) -> float:
        """Vocabulary-head rows per token beyond the final layer's one."""
        return self.token_stats().extra_head_rows or 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: every field but ``candidates`` (a trace holds them), and the figures."""
        out = asdict(self)
        del out["candidates"]
        stats = self.token_stats()
        out["non_final_share"] = self.non_final_share
        out["mean_depth"] = self.mean_depth
        out["changed_share"] = stats.changed_share
        out["extra_head_rows"] = stats.extra_head_rows or 0.0
        out["depth_histogram"] = stats.to_dict()["depth_histogram"]
        return out


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    strategy: str | Strategy | ResolvedStrategy | None = "final",
    params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """Generate a whole response; takes every argument of :func:`stream_generate`."""
    resolved = resolve_strategy(strategy, params)
    tokenizer = _wrap(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt)
    collector = ResultCollector(prompt_ids.tolist(), resolved)
    for response in stream_generate(model, tokenizer, prompt_ids, strategy=resolved, **kwargs):
        collector.add(response)
    return collector.result()


class ResultCollector:
    """Builds a :class:`GenerationResult` from one sequence's :class:`TokenEvent` s.

    The single-stream loop and every row of a batch are collected by this class.
    """

    def __init__(self, prompt_tokens: Sequence[int], strategy: Strategy | ResolvedStrategy) -> None:
        self.prompt_tokens = [int(t) for t in prompt_tokens]
        self.strategy = resolve_strategy(strategy).info()
        self.pieces: list[str] = []
        self.reasoning: list[str] = []
        self.parts: list[str] = []
        self.tokens: list[int] = []
        self.layers: list[int] = []
        self.entropies: list[float] = []
        self.extras: dict[str, list[int]] = {}
        self.changed: list[bool | None] = []
        self.head_rows: list[int] = []
        self.candidates: list[dict[int, float]] = []
        self.last: TokenEvent | None = None

    def add(self, response: TokenEvent) -> None:
        self.last = response
        self.pieces.append(response.text)
        self.reasoning.append(response.reasoning)
        if not response.in_output:
            return  # the end-of-sequence token is not part of the output
        self.parts.append(response.part)
        self.tokens.append(response.token)
        self.layers.append(response.layer)
        self.entropies.append(response.entropy)
        for key, value in response.extras.items():
            self.extras.setdefault(key, []).append(value)
        self.changed.append(response.changed)
        self.head_rows.append(response.head_rows)
        self.candidates.append(response.candidates)

    def result(self, finish_reason: str | None = None) -> GenerationResult:
        """The result so far; ``finish_reason`` overrides the last response's."""
        last = self.last
        if last is None:
            raise ValueError("no response was collected")
        return GenerationResult(
            text="".join(self.pieces),
            prompt_tokens=self.prompt_tokens,
            tokens=self.tokens,
            layers=self.layers,
            entropies=self.entropies,
            num_layers=last.num_layers,
            strategy=self.strategy,
            finish_reason=finish_reason or last.finish_reason or "length",
            prompt_tps=last.prompt_tps,
            generation_tps=last.generation_tps,
            peak_memory_gb=last.peak_memory,
            extras=self.extras,
            stop_sequence=last.matched_stop,
            reasoning="".join(self.reasoning) if REASONING in self.parts else None,
            parts=self.parts,
            changed=self.changed,
            head_rows=self.head_rows,
            candidates=self.candidates,
        )
