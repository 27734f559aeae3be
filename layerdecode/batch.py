"""Batched decoding: many prompts at once, each row choosing its own layer.

Every prompt is a row of one :class:`~layerdecode.engine.Engine`: prefilled together with
mlx-lm's own batch machinery (per-prompt caches merged into batch caches), then decoded with
one forward pass per step for every row. Rows finish at their own end-of-sequence token, stop
sequence or budget and leave the caches, so a finished row stops costing compute. Each row is
collected like a single run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adapters import Adapter
from .config import ResolvedStrategy, resolve_strategy
from .engine import Engine, LogitsProcessor, Plan, Sampler, TokenEvent
from .errors import ConfigError, LayerdecodeError
from .generation import GenerationResult, ResultCollector, resolve_call
from .options import GenerationOptions
from .prompts import encode_prompt
from .strategy import Strategy


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


def _check_batch(engine: Engine, prompts: list[list[int]], budgets: list[int]) -> None:
    if not prompts:
        raise ConfigError("No prompts given: pass at least one prompt.")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ConfigError(f"Prompt {empty[0]} of the batch is empty: give at least one token.")
    if len(budgets) != len(prompts) or any(b <= 0 for b in budgets):
        raise ConfigError("max_tokens must be positive, one value or one per prompt.")
    needed = estimate_batch_bytes(
        engine.adapter, engine.model, [len(p) for p in prompts], max(budgets), engine.num_layers
    )
    available = _available_bytes()
    if available is not None and needed > 0.8 * available:
        raise LayerdecodeError(
            f"A batch of {len(prompts)} prompts (longest {max(map(len, prompts))} tokens, "
            f"{max(budgets)} new) needs about {needed / 1e9:.1f} GB but this machine has "
            f"{available / 1e9:.1f} GB: use a smaller batch size or fewer max tokens."
        )


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    model: nn.Module,
    strategy: Strategy | ResolvedStrategy | str,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    max_tokens: int | Sequence[int] = 256,
    stop_tokens: Sequence[int] = (),
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
) -> Generator[list[TokenEvent], None, None]:
    """Yield, step by step, the tokens of the rows still generating.

    Args:
        prompts: token ids per prompt (each non-empty).
        model: an mlx-lm model.
        strategy: the strategy (its ``select`` sees ``(rows, ...)`` arrays).
        sampler: maps log-probabilities ``(rows, vocab)`` to tokens; greedy by default.
        logits_processors: mlx-lm processors, applied to each row with its own history.
        max_tokens: budget per row: one int for all rows, or one per row.
        stop_tokens: ids that end a row, reported with ``finish_reason="stop"``.
        prefill_step_size: prompt tokens per forward pass during prefill.
        max_kv_size: a rotating cache of that size, as in mlx-lm.

    Yields:
        Per step, one :class:`~layerdecode.engine.TokenEvent` per running row; ``row`` is
        the prompt's index.
    """
    prompts = [list(p) for p in prompts]
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    engine = Engine(model, None, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size)
    _check_batch(engine, prompts, budgets)
    resolved = resolve_strategy(strategy)
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        plan = Plan(
            resolved,
            GenerationOptions(max_tokens=budget),
            sampler=sampler,
            logits_processors=tuple(logits_processors or ()),
            stop_tokens=tuple(stop_tokens),
        )
        engine.add(prompt, plan, key=i)
    return engine.run()


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
    candidates: bool = False,
    **kwargs: Any,
) -> tuple[list[GenerationResult], BatchStats]:
    """Generate for many prompts at once; results come back in the prompts' order.

    Takes the options of :func:`layerdecode.stream_generate`, plus ``batch_size`` (prompts
    decoded together; default all; 1 runs them one by one), ``progress`` (called with
    (done, total) prompts) and ``on_result`` (called with (prompt index, result) as soon as
    a prompt finishes, with the speeds measured so far) and ``candidates`` (each result's
    ``candidates``: the entropy of every layer the strategy read). The returned results
    carry the whole run's speeds.
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
    max_tokens = chosen.max_tokens_or_default()
    engine = Engine(model, tokenizer, **step_kwargs)
    plan = Plan(
        resolved,
        chosen,
        sampler=sampler,
        logits_processors=tuple(logits_processors or ()),
        candidates=candidates,
    )
    with wired_limit(model, [generation_stream]):
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            _check_batch(engine, [encoded[i] for i in chunk], [max_tokens] * len(chunk))
            collectors = {i: ResultCollector(encoded[i], resolved) for i in chunk}
            tic = time.perf_counter()
            for i in chunk:
                engine.add(encoded[i], plan, key=i)
            first = True
            for events in engine.run():
                if first:
                    prompt_time += time.perf_counter() - tic
                    tic = time.perf_counter()
                    first = False
                for event in events:
                    collectors[event.row].add(event)
                    if event.finish_reason is None:
                        continue
                    result = collectors[event.row].result()
                    generated += len(result.tokens)
                    result.prompt_tps = sum(map(len, encoded)) / max(prompt_time, 1e-9)
                    result.generation_tps = generated / max(time.perf_counter() - run_tic, 1e-9)
                    results[event.row] = result
                    if on_result is not None:
                        on_result(event.row, result)
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
