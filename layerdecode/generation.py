"""The single-stream loop: ``generate_step`` -> ``stream_generate`` -> ``generate``.

It mirrors mlx-lm's three layers: :func:`generate_step` yields tokens (each with the layer
it came from) from the step factory in :mod:`layerdecode.decode`; :func:`stream_generate`
adds text, stop sequences and timings; :func:`generate` collects a whole
:class:`GenerationResult`. Public entry points resolve the strategy and the options once;
everything below them takes only the resolved forms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import ResolvedStrategy, resolve_strategy
from .decode import Decoder, LogitsProcessor, Sampler, pipelined
from .errors import ConfigError
from .options import GenerationOptions
from .prompts import encode_prompt
from .reasoning import ANSWER, REASONING, layers_by_part
from .strategy import Strategy
from .text import OutputStream, Released

# Keyword arguments of the step loops; every other keyword is a generation option.
STEP_KEYS = ("max_kv_size", "prompt_cache", "prefill_step_size", "prompt_progress_callback")


class Step(NamedTuple):
    """One generated token and where it came from."""

    token: int
    layer: int
    entropy: float
    logprobs: mx.array
    extras: dict[str, int]


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    strategy: Strategy,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    **kwargs: Any,
) -> Generator[Step, None, None]:
    """Yield generated tokens, each decoded from the layer ``strategy`` selects.

    Args:
        prompt: 1-D array of prompt token ids.
        model: an mlx-lm model with a supported architecture (see ``adapters``).
        strategy: a strategy object; it is ``prepare``-d here for this model.
        max_tokens: number of tokens to generate (-1: no limit).
        sampler: maps log-probabilities ``(1, vocab)`` to a token; greedy by default.
        logits_processors: mlx-lm logits processors, applied to the strategy's logits.
        kwargs: as in mlx-lm: ``max_kv_size`` (a rotating cache of that size),
            ``prompt_cache`` (a cache from ``make_prompt_cache`` to fill and reuse),
            ``prefill_step_size`` (prompt tokens per forward pass, 2048) and
            ``prompt_progress_callback`` (called with (processed, total) prompt tokens).
    """
    decoder = Decoder(model, strategy, sampler=sampler, logits_processors=logits_processors)
    return decoder_steps(decoder, prompt, max_tokens=max_tokens, **kwargs)


def decoder_steps(
    decoder: Decoder,
    prompt: mx.array,
    *,
    max_tokens: int,
    max_kv_size: int | None = None,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
) -> Generator[Step, None, None]:
    """:func:`generate_step` for a decoder that is already set up."""
    if prompt.ndim != 1 or prompt.size == 0:
        raise ConfigError("The prompt is empty: give at least one token.")
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(decoder.model, max_kv_size)
    return _steps(
        decoder,
        prompt,
        max_tokens=max_tokens,
        cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        progress=prompt_progress_callback,
    )


def _steps(
    decoder: Decoder,
    prompt: mx.array,
    *,
    max_tokens: int,
    cache: list[Any],
    prefill_step_size: int,
    progress: Callable[[int, int], None] | None,
) -> Generator[Step, None, None]:
    if max_tokens == 0:
        return
    histories = decoder.histories([prompt[:-1].tolist()])
    last = decoder.prefill(prompt, cache, step_size=prefill_step_size, progress=progress)
    produced = 0

    def next_step(current):
        nonlocal produced
        produced += 1
        if produced == max_tokens:
            return None
        return decoder.step(current.tokens, cache, histories)

    for n, out in enumerate(pipelined(decoder.step(last, cache, histories), next_step)):
        if n == 0:
            mx.eval(out.tokens)
            if progress is not None:
                progress(prompt.size, prompt.size)
        decision = out.decision
        yield Step(
            out.tokens.item(),
            decision.layers.item(),
            decision.entropy.item(),
            out.logprobs.squeeze(0),
            {k: v.item() for k, v in decision.extras.items()},
        )
        if n % 256 == 0:
            mx.clear_cache()


@dataclass
class LayerResponse:
    """One streamed piece of output, like mlx-lm's ``GenerationResponse``, plus its layer.

    Attributes:
        text: the next segment of the answer text (may be empty).
        token: the token id.
        layer: 0-based decoder layer the token was decoded from (final: ``num_layers - 1``).
        entropy: entropy in nats of that layer's distribution at this step.
        extras: strategy-specific per-token facts (DoLa: ``premature_layer``).
        logprobs: log-probabilities the token was sampled from.
        num_layers: decoder layers of the model.
        prompt_tokens: number of prompt tokens.
        prompt_tps: prompt tokens per second.
        generation_tokens: tokens generated so far.
        generation_tps: generated tokens per second.
        peak_memory: peak memory so far, in GB.
        finish_reason: ``"stop"``, ``"length"`` or ``None`` before the last response.
        matched_stop: the stop sequence that ended the generation, if one did.
        reasoning: the next segment of the reasoning text (thinking models; may be empty).
        part: ``"reasoning"`` for a token of the reasoning or its markers, else ``"answer"``.
    """

    text: str
    token: int
    layer: int
    entropy: float
    extras: dict[str, int]
    logprobs: mx.array
    num_layers: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    matched_stop: str | None = None
    reasoning: str = ""
    part: str = ANSWER


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
    **kwargs: Any,
) -> Generator[LayerResponse, None, None]:
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
        **step_kwargs,
    )


def _wrap(tokenizer: Any) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def make_decoder(
    model: nn.Module,
    resolved: ResolvedStrategy,
    options: GenerationOptions,
    *,
    sampler: Sampler | None = None,
    logits_processors: Iterable[LogitsProcessor] | None = None,
) -> Decoder:
    """The step factory for a resolved strategy and options (seeds MLX's random state)."""
    options.seed_random()
    return Decoder(
        model,
        resolved.strategy,
        sampler=sampler or options.sampler(),
        logits_processors=[*(logits_processors or ()), *options.logits_processors()],
    )


def stream_resolved(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: mx.array,
    resolved: ResolvedStrategy,
    options: GenerationOptions,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    **step_kwargs: Any,
) -> Generator[LayerResponse, None, None]:
    """:func:`stream_generate` for a resolved strategy, options and encoded prompt.

    ``step_kwargs`` are :func:`decoder_steps`' (``max_kv_size``, ``prompt_cache``...).
    """
    max_tokens = options.max_tokens_or_default()
    decoder = make_decoder(
        model, resolved, options, sampler=sampler, logits_processors=logits_processors
    )
    steps = decoder_steps(decoder, prompt, max_tokens=max_tokens, **step_kwargs)
    output = OutputStream(
        tokenizer, max_tokens=max_tokens, stop=options.stop_sequences, prompt=prompt.tolist()
    )
    return _responses(model, prompt.size, decoder.num_layers, steps, output)


def _responses(model, prompt_size, num_layers, steps, output):
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        for n, step in enumerate(steps):
            if n == 0:
                prompt_tps = prompt_size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            released = output.feed(step.token)
            yield make_response(
                released,
                step,
                num_layers=num_layers,
                prompt_tokens=prompt_size,
                prompt_tps=prompt_tps,
                generated=n + 1,
                tic=tic,
                matched_stop=output.matched_stop,
            )
            if released.finish is not None:
                break


def make_response(
    released: Released,
    step: Step,
    *,
    num_layers: int,
    prompt_tokens: int,
    prompt_tps: float,
    generated: int,
    tic: float,
    matched_stop: str | None = None,
) -> LayerResponse:
    """A :class:`LayerResponse` for one step's released text, with the speed since ``tic``."""
    return LayerResponse(
        text=released.text,
        token=step.token,
        layer=step.layer,
        entropy=step.entropy,
        extras=step.extras,
        logprobs=step.logprobs,
        num_layers=num_layers,
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tps,
        generation_tokens=generated,
        generation_tps=generated / max(time.perf_counter() - tic, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=released.finish,
        matched_stop=matched_stop,
        reasoning=released.reasoning,
        part=released.part,
    )


@dataclass
class GenerationResult:
    """A whole generation: text, tokens and, per token, the layer it came from.

    ``tokens``, ``layers``, ``entropies``, ``parts`` and ``extras`` have one entry per
    generated token (the end-of-sequence token, which is not part of the text, is left out;
    the tokens that spelled a stop sequence are kept, while the text ends before it).
    ``text`` is the answer; a thinking model's reasoning is in ``reasoning`` (None when the
    output had none), and ``parts`` says of each token whether it belongs to the
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

    def layers_by_part(self) -> dict[str, list[int]]:
        """The layers of the reasoning's tokens and of the answer's (only the answer's when
        there was no reasoning)."""
        return layers_by_part(self.layers, self.parts if self.reasoning is not None else ())

    @property
    def non_final_share(self) -> float:
        """Share of tokens decoded from a layer below the final one."""
        final = self.num_layers - 1
        return (
            sum(layer != final for layer in self.layers) / len(self.layers) if self.layers else 0.0
        )

    @property
    def mean_depth(self) -> float:
        """Mean number of layers below the final one that tokens were decoded from."""
        final = self.num_layers - 1
        return (
            sum(final - layer for layer in self.layers) / len(self.layers) if self.layers else 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["non_final_share"] = self.non_final_share
        out["mean_depth"] = self.mean_depth
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
    """Builds a :class:`GenerationResult` from one sequence's :class:`LayerResponse` s.

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
        self.last: LayerResponse | None = None

    def add(self, response: LayerResponse) -> None:
        self.last = response
        self.pieces.append(response.text)
        self.reasoning.append(response.reasoning)
        if response.finish_reason == "stop" and response.matched_stop is None:
            return  # the end-of-sequence token is not part of the output
        self.parts.append(response.part)
        self.tokens.append(response.token)
        self.layers.append(response.layer)
        self.entropies.append(response.entropy)
        for key, value in response.extras.items():
            self.extras.setdefault(key, []).append(value)

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
        )


def __getattr__(name: str) -> Any:
    if name == "make_generation_options":
        import warnings

        warnings.warn(
            f"layerdecode.generation.{name} is gone: pass options=GenerationOptions(...) "
            "(or keywords) to generate/stream_generate/batch_generate",
            DeprecationWarning,
            stacklevel=2,
        )
        return _make_generation_options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_generation_options(
    generation: GenerationOptions,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    **options: Any,
) -> tuple[Sampler | None, list[LogitsProcessor]]:
    """The old (sampler, processors) builder, kept for code written against it."""
    chosen = GenerationOptions.build(**options).over(generation)
    return sampler or chosen.sampler(), [*(logits_processors or ()), *chosen.logits_processors()]
