"""The core loop: prefill, step, let the strategy pick a layer, sample, yield.

It mirrors ``mlx_lm.generate.generate_step`` -- mlx-lm's KV caches, samplers and logits
processors, and the same pipelining: step n+1 is built and ``mx.async_eval``-ed before
step n is handed to the caller, so a strategy made of vectorised ``mx`` ops adds no
host synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import ValidationError

from .adapters import get_adapter
from .config import GenerationDefaults, ResolvedStrategy, resolve_strategy
from .errors import ConfigError
from .strategy import ModelFacts, Strategy
from .taps import install_taps
from .view import LayerView

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


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
    max_kv_size: int | None = None,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
) -> Generator[Step, None, None]:
    """Yield generated tokens, each decoded from the layer ``strategy`` selects.

    Args:
        prompt: 1-D array of prompt token ids.
        model: an mlx-lm model with a supported architecture (see ``adapters``).
        strategy: a strategy object; it is ``prepare``-d here for this model.
        max_tokens: number of tokens to generate (-1: no limit).
        sampler: maps log-probabilities ``(1, vocab)`` to a token; greedy by default.
        logits_processors: mlx-lm logits processors, applied to the strategy's logits.
        max_kv_size: maximum KV cache size (a rotating cache), as in mlx-lm.
        prompt_cache: a cache from ``make_prompt_cache`` to fill and reuse.
        prefill_step_size: prompt tokens processed per forward pass.
        prompt_progress_callback: called with (processed, total) prompt tokens.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ConfigError("The prompt is empty: give at least one token.")
    adapter = get_adapter(model)
    taps = install_taps(adapter.layers)
    strategy.prepare(ModelFacts(adapter.num_layers, adapter.tied_embeddings, adapter.model_type))
    exits = tuple(strategy.exits())
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    processors = list(logits_processors or [])
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_kv_size)
    progress = prompt_progress_callback or (lambda *_: None)
    tokens = None

    def _step(inputs: mx.array):
        nonlocal tokens
        with mx.stream(generation_stream):
            with taps.capture() as capture:
                logits = model(inputs[None], cache=cache)
            view = LayerView(adapter, capture, logits[:, -1, :], exits)
            decision = strategy.select(view)
            logits = decision.logits
            if processors:
                tokens = mx.concat([tokens, inputs]) if tokens is not None else inputs
                for processor in processors:
                    logits = processor(tokens, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = sampler(logprobs)
            return token, logprobs.squeeze(0), decision

    with mx.stream(generation_stream):
        total = prompt.size
        done = 0
        progress(done, total)
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            model(prompt[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            if processors:
                tokens = mx.concat([tokens, prompt[:n]]) if tokens is not None else prompt[:n]
            done += n
            progress(done, total)
            prompt = prompt[n:]
            mx.clear_cache()

        y, logprobs, decision = _step(prompt)
        mx.async_eval(y, logprobs, decision.layers, decision.entropy, *decision.extras.values())
        n = 0
        while True:
            if n != max_tokens:
                next_y, next_logprobs, next_decision = _step(y)
                mx.async_eval(
                    next_y,
                    next_logprobs,
                    next_decision.layers,
                    next_decision.entropy,
                    *next_decision.extras.values(),
                )
            if n == 0:
                mx.eval(y)
                progress(total, total)
            if n == max_tokens:
                break
            yield Step(
                y.item(),
                decision.layers.item(),
                decision.entropy.item(),
                logprobs,
                {k: v.item() for k, v in decision.extras.items()},
            )
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs, decision = next_y, next_logprobs, next_decision
            n += 1


@dataclass
class LayerResponse:
    """One streamed piece of output, like mlx-lm's ``GenerationResponse``, plus its layer.

    Attributes:
        text: the next segment of decoded text (may be empty).
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


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str | Sequence[int] | mx.array) -> mx.array:
    """Prompt ids the way mlx-lm makes them (a BOS is added unless the text has one)."""
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigError("The prompt is empty: give some text.")
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(list(prompt), dtype=mx.uint32)


def make_generation_options(
    generation: GenerationDefaults,
    *,
    sampler: Sampler | None,
    logits_processors: Sequence[LogitsProcessor] | None,
    temp: float | None,
    top_p: float | None,
    min_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    repetition_context_size: int | None,
) -> tuple[Sampler | None, list[LogitsProcessor]]:
    """Sampler and processors from explicit options, falling back to a preset's defaults."""

    def pick(value, default, fallback):
        return value if value is not None else (default if default is not None else fallback)

    try:
        chosen = GenerationDefaults(
            temp=pick(temp, generation.temp, None),
            top_p=pick(top_p, generation.top_p, None),
            min_p=pick(min_p, generation.min_p, None),
            top_k=pick(top_k, generation.top_k, None),
            repetition_penalty=pick(repetition_penalty, generation.repetition_penalty, None),
            repetition_context_size=pick(
                repetition_context_size, generation.repetition_context_size, None
            ),
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(
            f"Invalid generation option {err['loc'][0]}={err.get('input')!r}: {err['msg']}."
        ) from None
    if sampler is None and (chosen.temp or 0.0) > 0:
        sampler = make_sampler(
            temp=chosen.temp,
            top_p=chosen.top_p or 0.0,
            min_p=chosen.min_p or 0.0,
            top_k=chosen.top_k or 0,
        )
    processors = list(logits_processors or [])
    if chosen.repetition_penalty is not None and chosen.repetition_penalty != 1.0:
        processors += make_logits_processors(
            repetition_penalty=chosen.repetition_penalty,
            repetition_context_size=chosen.repetition_context_size or 20,
        )
    return sampler, processors


def prepare_generation(
    strategy: str | Strategy | ResolvedStrategy | None,
    params: dict[str, Any] | None,
    *,
    max_tokens: int | None,
    unlimited_ok: bool = False,
    seed: int | None = None,
    **options: Any,
) -> tuple[ResolvedStrategy, int, Sampler | None, list[LogitsProcessor]]:
    """Resolve the strategy, check ``max_tokens`` and build the sampler and processors.

    ``options`` are the sampler/processor options of :func:`make_generation_options`;
    ``seed`` seeds MLX's random state.
    """
    resolved = resolve_strategy(strategy, params)
    if max_tokens is None:
        max_tokens = resolved.generation.max_tokens or 256
    if max_tokens <= 0 and not (unlimited_ok and max_tokens == -1):
        extra = " (or -1 for no limit)" if unlimited_ok else ""
        raise ConfigError(f"max_tokens must be positive{extra}, got {max_tokens}.")
    sampler, processors = make_generation_options(resolved.generation, **options)
    if seed is not None:
        mx.random.seed(seed)
    return resolved, max_tokens, sampler, processors


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    strategy: str | Strategy | ResolvedStrategy | None = "final",
    params: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    temp: float | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> Generator[LayerResponse, None, None]:
    """Stream text decoded with ``strategy``; the last response carries the timings.

    Args:
        model, tokenizer: as returned by :func:`layerdecode.load` (or ``mlx_lm.load``).
        prompt: text (encoded as mlx-lm does) or token ids.
        strategy: a registered strategy name, a preset name, a YAML preset path or a
            :class:`~layerdecode.strategy.Strategy` object.
        params: strategy params (override the preset's).
        max_tokens: tokens to generate (default: the preset's, else 256; -1: no limit).
        sampler, logits_processors: mlx-lm sampler and processors; when not given they are
            built from ``temp``/``top_p``/``min_p``/``top_k`` and ``repetition_penalty``
            (falling back to the preset's generation defaults, then greedy).
        seed: seeds MLX's random state before generating.
        kwargs: passed to :func:`generate_step` (``max_kv_size``, ``prompt_cache``...).
    """
    resolved, max_tokens, sampler, processors = prepare_generation(
        strategy,
        params,
        max_tokens=max_tokens,
        unlimited_ok=True,
        sampler=sampler,
        logits_processors=logits_processors,
        temp=temp,
        top_p=top_p,
        min_p=min_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        seed=seed,
    )
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = encode_prompt(tokenizer, prompt)
    num_layers = get_adapter(model).num_layers
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = generate_step(
        prompt,
        model,
        resolved.strategy,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        **kwargs,
    )
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        step = None
        n = 0
        for n, step in enumerate(steps):
            if n == 0:
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if step.token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(step.token)
            if (n + 1) == max_tokens:
                break
            yield _response(
                detokenizer.last_segment,
                step,
                num_layers,
                prompt.size,
                prompt_tps,
                n + 1,
                tic,
                None,
            )
        detokenizer.finalize()
        finish = "stop" if step.token in tokenizer.eos_token_ids else "length"
        yield _response(
            detokenizer.last_segment, step, num_layers, prompt.size, prompt_tps, n + 1, tic, finish
        )


def _response(text, step: Step, num_layers, prompt_tokens, prompt_tps, n, tic, finish):
    return LayerResponse(
        text=text,
        token=step.token,
        layer=step.layer,
        entropy=step.entropy,
        extras=step.extras,
        logprobs=step.logprobs,
        num_layers=num_layers,
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tps,
        generation_tokens=n,
        generation_tps=n / max(time.perf_counter() - tic, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )


@dataclass
class GenerationResult:
    """A whole generation: text, tokens and, per token, the layer it came from.

    ``tokens``, ``layers``, ``entropies`` and ``extras`` have one entry per generated token
    (the end-of-sequence token, which is not part of the text, is left out).
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
        from dataclasses import asdict

        out = asdict(self)
        out["non_final_share"] = self.non_final_share
        out["mean_depth"] = self.mean_depth
        return out


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    strategy: str | Strategy | None = "final",
    params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """Generate a whole response; see :func:`stream_generate` for the options."""
    resolved = resolve_strategy(strategy, params)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt)
    collector = ResultCollector(prompt_ids.tolist(), resolved.strategy)
    for response in stream_generate(model, tokenizer, prompt_ids, strategy=resolved, **kwargs):
        collector.add(response)
    return collector.result()


class ResultCollector:
    """Builds a :class:`GenerationResult` from the responses of :func:`stream_generate`."""

    def __init__(self, prompt_tokens: Sequence[int], strategy: Strategy) -> None:
        self.prompt_tokens = [int(t) for t in prompt_tokens]
        self.strategy = {"name": strategy.name, "params": strategy.resolved_params()}
        self.pieces: list[str] = []
        self.tokens: list[int] = []
        self.layers: list[int] = []
        self.entropies: list[float] = []
        self.extras: dict[str, list[int]] = {}
        self.last: LayerResponse | None = None

    def add(self, response: LayerResponse) -> None:
        self.last = response
        self.pieces.append(response.text)
        if response.finish_reason == "stop":
            return  # the end-of-sequence token is not part of the output
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
        )
