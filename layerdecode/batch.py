"""Batched decoding: many prompts at once, each row choosing its own layer.

Prompts are prefilled with mlx-lm's own batch machinery (``PromptProcessingBatch``:
per-prompt caches merged into batch caches, right-padded prefill rolled into left
padding), then decoded with the same step factory as a single run
(:mod:`layerdecode.decode`) over ``(rows, ...)`` arrays. Rows finish at their own
end-of-sequence token, stop sequence or budget and are filtered out of the caches, so a
finished row stops costing compute. Each row is collected like a single run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import PromptProcessingBatch, generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adapters import Adapter
from .config import ResolvedStrategy
from .decode import Decoder, LogitsProcessor, Sampler, StepOutput, pipelined
from .errors import ConfigError, LayerdecodeError
from .generation import (
    GenerationResult,
    LayerResponse,
    ResultCollector,
    Step,
    make_decoder,
    make_response,
    resolve_call,
    stream_resolved,
)
from .options import GenerationOptions
from .prompts import encode_prompt
from .strategy import Strategy
from .text import OutputStream


@dataclass
class RowStep:
    """One token of one row of a batch.

    A consumer of :func:`batch_generate_step` may set ``finish_reason`` of a yielded row
    (e.g. to ``"stop"`` when its text reached a stop sequence): the row then ends there.
    """

    row: int
    token: int
    layer: int
    entropy: float
    extras: dict[str, int]
    finish_reason: str | None
    logprobs: mx.array | None = None


def estimate_batch_bytes(
    adapter: Adapter, model: nn.Module, lengths: Sequence[int], max_tokens: int, exits: int
) -> int:
    """A rough upper bound of the memory a batch needs beyond the weights."""
    from .logit_rules import model_setting

    def setting(name: str, default: int) -> int:
        value = model_setting(model, name)
        return int(value) if isinstance(value, (int, float)) and value else default

    hidden = setting("hidden_size", 4096)
    heads = setting("num_attention_heads", 32)
    kv_heads = setting("num_key_value_heads", heads)
    head_dim = setting("head_dim", hidden // max(heads, 1))
    vocab = setting("vocab_size", 32000)
    batch = len(lengths)
    positions = max(lengths) + max_tokens
    kv = 2 * adapter.num_layers * batch * kv_heads * head_dim * positions * 4
    prefill = batch * max(lengths) * (hidden * 8 + vocab) * 4
    logits = (exits + 4) * batch * vocab * 4
    return kv + prefill + logits


def _available_bytes() -> int | None:
    info = mx.device_info()
    size = info.get("memory_size") or info.get("max_recommended_working_set_size")
    if size:
        return int(size)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    model: nn.Module,
    strategy: Strategy,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    **kwargs: Any,
) -> Generator[list[RowStep], None, None]:
    """Yield, step by step, the tokens of the rows still generating.

    Args:
        prompts: token ids per prompt (each non-empty).
        model: an mlx-lm model with a supported architecture.
        strategy: the strategy (its ``select`` sees ``(rows, ...)`` arrays).
        sampler: maps log-probabilities ``(rows, vocab)`` to tokens; greedy by default.
        logits_processors: mlx-lm processors, applied to each row with its own history.
        kwargs: ``max_tokens`` (budget per row: one int for all rows, or one per row; 256),
            ``stop_tokens`` (ids that end a row, reported with ``finish_reason="stop"``),
            ``prefill_step_size`` (prompt tokens per forward pass during prefill, 2048) and
            ``max_kv_size`` (a rotating cache of that size, as in mlx-lm).
    """
    decoder = Decoder(model, strategy, sampler=sampler, logits_processors=logits_processors)
    return _batch_steps(decoder, prompts, **kwargs)


def _check_batch(decoder: Decoder, prompts: list[list[int]], budgets: list[int]) -> None:
    if not prompts:
        raise ConfigError("No prompts given: pass at least one prompt.")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ConfigError(f"Prompt {empty[0]} of the batch is empty: give at least one token.")
    if len(budgets) != len(prompts) or any(b <= 0 for b in budgets):
        raise ConfigError("max_tokens must be positive, one value or one per prompt.")
    needed = estimate_batch_bytes(
        decoder.adapter, decoder.model, [len(p) for p in prompts], max(budgets), len(decoder.exits)
    )
    available = _available_bytes()
    if available is not None and needed > 0.8 * available:
        raise LayerdecodeError(
            f"A batch of {len(prompts)} prompts (longest {max(map(len, prompts))} tokens, "
            f"{max(budgets)} new) needs about {needed / 1e9:.1f} GB but this machine has "
            f"{available / 1e9:.1f} GB: use a smaller batch size or fewer max tokens."
        )


def _batch_steps(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int | Sequence[int] = 256,
    stop_tokens: Sequence[int] = (),
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
) -> Generator[list[RowStep], None, None]:
    prompts = [list(p) for p in prompts]
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    _check_batch(decoder, prompts, budgets)
    model = decoder.model
    with mx.stream(generation_stream):
        prefill = PromptProcessingBatch(
            model,
            uids=list(range(len(prompts))),
            caches=[make_prompt_cache(model, max_kv_size) for _ in prompts],
            prefill_step_size=prefill_step_size,
        )
        if any(len(p) > 1 for p in prompts):
            prefill.prompt([p[:-1] for p in prompts])
        cache = prefill.prompt_cache
    histories = decoder.histories([p[:-1] for p in prompts])
    stop = set(stop_tokens)
    active = list(range(len(prompts)))
    counts = [0] * len(prompts)
    ended: list[int] = []  # positions (within ``active``) of rows that ended at the last step

    def next_step(current: StepOutput) -> StepOutput | None:
        if all(counts[row] + 1 >= budgets[row] for row in active):
            return None
        rows = [histories[row] for row in active] if histories else ()
        return decoder.step(current.tokens, cache, rows)

    def settle(upcoming: StepOutput) -> StepOutput | None:
        nonlocal active
        if not ended:
            return upcoming
        keep = [i for i in range(len(active)) if i not in set(ended)]
        if not keep:
            return None
        index = mx.array(keep)
        for c in cache:
            c.filter(index)
        active = [active[i] for i in keep]
        return upcoming.take(index)

    first = decoder.step(mx.array([p[-1] for p in prompts], dtype=mx.uint32), cache, histories)
    for out in pipelined(first, next_step, settle):
        rows = []
        for i, (row, (token, layer, entropy, extras)) in enumerate(
            zip(active, out.read(), strict=True)
        ):
            counts[row] += 1
            finish = None
            if token in stop:
                finish = "stop"
            elif counts[row] >= budgets[row]:
                finish = "length"
            rows.append(RowStep(row, token, layer, entropy, extras, finish, out.logprobs[i]))
        yield rows
        ended[:] = [i for i, r in enumerate(rows) if r.finish_reason is not None]


def batch_stream_resolved(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[Sequence[int]],
    resolved: ResolvedStrategy,
    options: GenerationOptions,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
) -> Generator[tuple[int, LayerResponse], None, None]:
    """``(row, response)`` for every token of every row, each row streamed like one run.

    Takes the resolved strategy and options (see :func:`batch_generate`). One prompt goes
    through the single-stream loop, which is what a batch of one is.
    """
    if len(prompts) == 1:
        prompt = mx.array(list(prompts[0]), dtype=mx.uint32)
        for response in stream_resolved(
            model,
            tokenizer,
            prompt,
            resolved,
            options,
            sampler=sampler,
            logits_processors=logits_processors,
            prefill_step_size=prefill_step_size,
            max_kv_size=max_kv_size,
        ):
            yield 0, response
        return
    max_tokens = options.max_tokens_or_default()
    if max_tokens == -1:
        raise ConfigError("max_tokens must be positive for a batch (-1, no limit, is not).")
    decoder = make_decoder(
        model, resolved, options, sampler=sampler, logits_processors=logits_processors
    )
    outputs = [
        OutputStream(tokenizer, max_tokens=max_tokens, stop=options.stop_sequences, prompt=p)
        for p in prompts
    ]
    steps = _batch_steps(
        decoder,
        prompts,
        max_tokens=max_tokens,
        stop_tokens=tokenizer.eos_token_ids,
        prefill_step_size=prefill_step_size,
        max_kv_size=max_kv_size,
    )
    prompt_size = sum(len(p) for p in prompts)
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        generated = 0
        for n, rows in enumerate(steps):
            if n == 0:
                prompt_tps = prompt_size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            for r in rows:
                generated += 1
                output = outputs[r.row]
                released = output.feed(r.token)
                r.finish_reason = released.finish  # a stop sequence ends the row too
                step = Step(r.token, r.layer, r.entropy, r.logprobs, r.extras)
                yield (
                    r.row,
                    make_response(
                        released,
                        step,
                        num_layers=decoder.num_layers,
                        prompt_tokens=len(prompts[r.row]),
                        prompt_tps=prompt_tps,
                        generated=generated,
                        tic=tic,
                        matched_stop=output.matched_stop,
                    ),
                )


@dataclass
class BatchStats:
    """Aggregate timing of a batched run."""

    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float


def batch_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[str | Sequence[int]],
    *,
    strategy: str | Strategy | ResolvedStrategy | None = "final",
    params: dict[str, Any] | None = None,
    options: GenerationOptions | dict[str, Any] | None = None,
    batch_size: int | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    **kwargs: Any,
) -> tuple[list[GenerationResult], BatchStats]:
    """Generate for many prompts at once; results come back in the prompts' order.

    Takes the options of :func:`layerdecode.stream_generate`, plus ``batch_size`` (prompts
    decoded together; default all; 1 runs them one by one), ``progress`` (called with
    (done, total) prompts) and ``on_result`` (called with (prompt index, result) as soon as
    a prompt finishes, with the speeds measured so far). The returned results carry the
    whole run's speeds.
    """
    if not prompts:
        raise ConfigError("No prompts given: pass at least one prompt.")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    resolved, chosen, step_kwargs = resolve_call(strategy, params, options, kwargs)
    if chosen.max_tokens == -1:
        raise ConfigError("max_tokens must be positive for a batch (-1, no limit, is not).")
    unknown = set(step_kwargs) - {"prefill_step_size", "max_kv_size"}
    if unknown:
        raise ConfigError(f"batch_generate does not take {', '.join(sorted(unknown))}.")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not prompt:
            raise ConfigError(f"Prompt {i} is empty: give some text.")
        ids = encode_prompt(tokenizer, prompt).tolist()
        if not ids:
            raise ConfigError(f"Prompt {i} is empty: give at least one token.")
        encoded.append(ids)
    size = batch_size or len(encoded)
    # Similar lengths together waste less padding; results go back in the given order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: dict[int, GenerationResult] = {}
    prompt_time = gen_time = 0.0
    generated = 0
    run_tic = time.perf_counter()
    mx.reset_peak_memory()
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        collectors = [ResultCollector(encoded[i], resolved) for i in chunk]
        tic = time.perf_counter()
        first = True
        for row, response in batch_stream_resolved(
            model,
            tokenizer,
            [encoded[i] for i in chunk],
            resolved,
            chosen,
            sampler=sampler,
            logits_processors=logits_processors,
            **step_kwargs,
        ):
            if first:
                prompt_time += time.perf_counter() - tic
                tic = time.perf_counter()
                first = False
            collectors[row].add(response)
            if response.finish_reason is None:
                continue
            index = chunk[row]
            result = collectors[row].result()
            generated += len(result.tokens)
            result.prompt_tps = sum(map(len, encoded)) / max(prompt_time, 1e-9)
            result.generation_tps = generated / max(time.perf_counter() - run_tic, 1e-9)
            results[index] = result
            if on_result is not None:
                on_result(index, result)
            if progress is not None:
                progress(len(results), len(encoded))
        gen_time += time.perf_counter() - tic
    stats = BatchStats(
        prompt_tokens=sum(map(len, encoded)),
        prompt_tps=sum(map(len, encoded)) / max(prompt_time, 1e-9),
        generation_tokens=generated,
        generation_tps=generated / max(gen_time, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    ordered = [results[i] for i in range(len(encoded))]
    for result in ordered:  # whole-run speeds, as documented
        result.prompt_tps = stats.prompt_tps
        result.generation_tps = stats.generation_tps
        result.peak_memory_gb = stats.peak_memory_gb
    return ordered, stats


def __getattr__(name: str) -> Any:
    if name == "detokenize":
        import warnings

        warnings.warn(
            "layerdecode.batch.detokenize is gone: batch rows are detokenized as they stream",
            DeprecationWarning,
            stacklevel=2,
        )
        return _detokenize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _detokenize(tokenizer: TokenizerWrapper, tokens: Sequence[int]) -> str:
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text
