"""Batched decoding: many prompts at once, each row choosing its own layer.

Prompts are prefilled with mlx-lm's own batch machinery (``PromptProcessingBatch``:
per-prompt caches merged into batch caches, right-padded prefill rolled into left
padding), then decoded by a loop like :func:`layerdecode.generation.generate_step` over
``(batch, ...)`` arrays. Rows finish at their own end-of-sequence token or budget and are
filtered out of the caches, so a finished row stops costing compute.
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
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adapters import Adapter, get_adapter
from .config import ResolvedStrategy
from .errors import ConfigError, LayerdecodeError
from .generation import GenerationResult, encode_prompt, prepare_generation
from .strategy import Decision, ModelFacts, Strategy
from .taps import install_taps
from .view import LayerView


@dataclass
class RowStep:
    """One token of one row of a batch."""

    row: int
    token: int
    layer: int
    entropy: float
    extras: dict[str, int]
    finish_reason: str | None


def _filter_decision(decision: Decision, keep: mx.array) -> Decision:
    return Decision(
        logits=decision.logits[keep],
        layers=decision.layers[keep],
        entropy=decision.entropy[keep],
        extras={k: v[keep] for k, v in decision.extras.items()},
    )


def _decision_arrays(decision: Decision) -> list[mx.array]:
    return [decision.layers, decision.entropy, *decision.extras.values()]


def estimate_batch_bytes(
    adapter: Adapter, model: nn.Module, lengths: Sequence[int], max_tokens: int, exits: int
) -> int:
    """A rough upper bound of the memory a batch needs beyond the weights."""
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", 4096)
    kv_heads = getattr(args, "num_key_value_heads", None) or getattr(
        args, "num_attention_heads", 32
    )
    heads = getattr(args, "num_attention_heads", 32)
    head_dim = getattr(args, "head_dim", None) or hidden // max(heads, 1)
    vocab = getattr(args, "vocab_size", 32000)
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
    max_tokens: int | Sequence[int] = 256,
    stop_tokens: Sequence[int] = (),
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: Sequence[Callable] | None = None,
    prefill_step_size: int = 2048,
    max_kv_size: int | None = None,
) -> Generator[list[RowStep], None, None]:
    """Yield, step by step, the tokens of the rows still generating.

    Args:
        prompts: token ids per prompt (each non-empty).
        model: an mlx-lm model with a supported architecture.
        strategy: the strategy (its ``select`` sees ``(rows, ...)`` arrays).
        max_tokens: budget per row (one int for all rows, or one per row).
        stop_tokens: ids that end a row (reported with ``finish_reason="stop"``).
        sampler: maps log-probabilities ``(rows, vocab)`` to tokens; greedy by default.
        logits_processors: mlx-lm processors, applied to each row with its own history.
        prefill_step_size: prompt tokens per forward pass during prefill.
        max_kv_size: maximum KV cache size (a rotating cache), as in mlx-lm.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ConfigError("No prompts given: pass at least one prompt.")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ConfigError(f"Prompt {empty[0]} of the batch is empty: give at least one token.")
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(budgets) != len(prompts) or any(b <= 0 for b in budgets):
        raise ConfigError("max_tokens must be positive, one value or one per prompt.")
    adapter = get_adapter(model)
    taps = install_taps(adapter.layers)
    strategy.prepare(ModelFacts(adapter.num_layers, adapter.tied_embeddings, adapter.model_type))
    exits = tuple(strategy.exits())
    needed = estimate_batch_bytes(
        adapter, model, [len(p) for p in prompts], max(budgets), len(exits)
    )
    available = _available_bytes()
    if available is not None and needed > 0.8 * available:
        raise LayerdecodeError(
            f"A batch of {len(prompts)} prompts (longest {max(map(len, prompts))} tokens, "
            f"{max(budgets)} new) needs about {needed / 1e9:.1f} GB but this machine has "
            f"{available / 1e9:.1f} GB: use a smaller batch size or fewer max tokens."
        )
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    processors = list(logits_processors or [])
    stop = set(stop_tokens)

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
    histories = [TokenBuffer(p[:-1]) for p in prompts] if processors else []
    active = list(range(len(prompts)))
    counts = [0] * len(prompts)

    def _step(inputs: mx.array, rows: list[int]):
        with mx.stream(generation_stream):
            with taps.capture() as capture:
                logits = model(inputs[:, None], cache=cache)
            view = LayerView(adapter, capture, logits[:, -1, :], exits)
            decision = strategy.select(view)
            logits = decision.logits
            if processors:
                processed = []
                for i, row in enumerate(rows):
                    row_logits = logits[i : i + 1]
                    history = histories[row].update_and_fetch(inputs[i : i + 1])
                    for processor in processors:
                        row_logits = processor(history, row_logits)
                    processed.append(row_logits)
                logits = mx.concatenate(processed, axis=0)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), decision

    y, decision = _step(mx.array([p[-1] for p in prompts], dtype=mx.uint32), active)
    mx.async_eval(y, *_decision_arrays(decision))
    while active:
        last_step = all(counts[row] + 1 >= budgets[row] for row in active)
        if not last_step:
            next_y, next_decision = _step(y, active)
            mx.async_eval(next_y, *_decision_arrays(next_decision))
        tokens = y.tolist()
        layers = decision.layers.tolist()
        entropies = decision.entropy.tolist()
        extras = {k: v.tolist() for k, v in decision.extras.items()}
        out, keep = [], []
        for i, row in enumerate(active):
            counts[row] += 1
            finish = None
            if tokens[i] in stop:
                finish = "stop"
            elif counts[row] >= budgets[row]:
                finish = "length"
            else:
                keep.append(i)
            out.append(
                RowStep(
                    row,
                    tokens[i],
                    layers[i],
                    entropies[i],
                    {k: v[i] for k, v in extras.items()},
                    finish,
                )
            )
        yield out
        if not keep or last_step:
            break
        if len(keep) < len(active):
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            next_y = next_y[index]
            next_decision = _filter_decision(next_decision, index)
            active = [active[i] for i in keep]
        y, decision = next_y, next_decision


def detokenize(tokenizer: TokenizerWrapper, tokens: Sequence[int]) -> str:
    """Text of ``tokens`` exactly as the streaming detokenizer of a single run makes it."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


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
    max_tokens: int | None = None,
    batch_size: int | None = None,
    sampler: Callable | None = None,
    logits_processors: Sequence[Callable] | None = None,
    temp: float | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    **kwargs: Any,
) -> tuple[list[GenerationResult], BatchStats]:
    """Generate for many prompts at once; results come back in the prompts' order.

    Takes the options of :func:`layerdecode.stream_generate`, plus ``batch_size`` (prompts
    decoded together; default all), ``progress`` (called with (done, total) prompts) and
    ``on_result`` (called with (prompt index, result) as soon as a prompt finishes, with
    the speeds measured so far). The returned results carry the whole run's speeds.
    """
    if not prompts:
        raise ConfigError("No prompts given: pass at least one prompt.")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    resolved, max_tokens, sampler, processors = prepare_generation(
        strategy,
        params,
        max_tokens=max_tokens,
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
    num_layers = get_adapter(model).num_layers
    rows: dict[int, dict[str, Any]] = {
        i: {"tokens": [], "layers": [], "entropies": [], "extras": {}} for i in range(len(encoded))
    }
    prompt_time = gen_time = 0.0
    generated = 0
    results: dict[int, GenerationResult] = {}
    strategy_info = {"name": resolved.strategy.name, "params": resolved.strategy.resolved_params()}
    run_tic = time.perf_counter()

    def finish(i: int, reason: str) -> None:
        row = rows[i]
        elapsed = max(time.perf_counter() - run_tic, 1e-9)
        results[i] = GenerationResult(
            text=detokenize(tokenizer, row["tokens"]),
            prompt_tokens=encoded[i],
            tokens=row["tokens"],
            layers=row["layers"],
            entropies=row["entropies"],
            num_layers=num_layers,
            strategy=strategy_info,
            finish_reason=reason,
            prompt_tps=sum(map(len, encoded)) / max(prompt_time, 1e-9),
            generation_tps=generated / elapsed,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            extras=row["extras"],
        )
        if on_result is not None:
            on_result(i, results[i])
        if progress is not None:
            progress(len(results), len(encoded))

    mx.reset_peak_memory()
    with wired_limit(model, [generation_stream]):
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            tic = time.perf_counter()
            first = True
            for step in batch_generate_step(
                [encoded[i] for i in chunk],
                model,
                resolved.strategy,
                max_tokens=max_tokens,
                stop_tokens=tokenizer.eos_token_ids,
                sampler=sampler,
                logits_processors=processors,
                **kwargs,
            ):
                if first:
                    prompt_time += time.perf_counter() - tic
                    tic = time.perf_counter()
                    first = False
                for r in step:
                    row = rows[chunk[r.row]]
                    if r.finish_reason != "stop":
                        generated += 1
                        row["tokens"].append(r.token)
                        row["layers"].append(r.layer)
                        row["entropies"].append(r.entropy)
                        for key, value in r.extras.items():
                            row["extras"].setdefault(key, []).append(value)
                    if r.finish_reason is not None:
                        finish(chunk[r.row], r.finish_reason)
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
