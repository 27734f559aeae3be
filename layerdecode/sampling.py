"""Per-row logits processors and sampling, with the draw replayed for the reference.

The engine compares each row's token with the one its reference logits (the final
layer's) give under the same processors, sampler and random draw: the "changed" flag.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler as greedy

from .fastmath import log_softmax
from .rows import Row, scatter


def process(
    logits: mx.array, reference: mx.array | None, tokens: mx.array, rows: list[Row]
) -> tuple[mx.array, mx.array | None]:
    """Each row's processors over its logits (and its reference logits, alike)."""
    if not any(r.processors for r in rows):
        return logits, reference
    out, ref = [], []
    for i, row in enumerate(rows):
        row_logits = logits[i : i + 1]
        if reference is not None:
            row_logits = mx.concatenate([row_logits, reference[i : i + 1]])
        if row.processors:
            history = row.history.update_and_fetch(tokens[i : i + 1])
            for processor in row.processors:
                row_logits = processor(history, row_logits)
        out.append(row_logits[:1])
        ref.append(row_logits[1:])
    if reference is not None:
        reference = mx.concatenate(ref, axis=0)
    return mx.concatenate(out, axis=0), reference


def sample(
    logprobs: mx.array, reference: mx.array | None, rows: list[Row]
) -> tuple[mx.array, mx.array | None]:
    """Each row's token, and whether it differs from the one its reference logits give
    under the same sampler and draw (1, 0; -1 for a sampler that cannot be replayed)."""
    if reference is not None:
        reference = log_softmax(reference)
    if all(r.sampler is None for r in rows):
        tokens = greedy(logprobs)
        if reference is None:
            return tokens, None
        return tokens, (tokens != greedy(reference)).astype(mx.int32)
    # Rows with the same sampling settings are sampled together.
    together: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        key = "greedy" if row.sampler is None else row.plan.sampling_key() or ("own", i)
        together.setdefault(key, []).append(i)
    parts, flags = [], []
    for positions in together.values():
        index = mx.array(positions) if len(positions) < len(rows) else None
        lp = logprobs if index is None else logprobs[index]
        ref = reference if reference is None or index is None else reference[index]
        tokens, flag = _sample_rows(lp, ref, rows[positions[0]])
        parts.append((positions, tokens))
        flags.append((positions, flag))
    changed = None if reference is None else scatter(flags, len(rows))
    return scatter(parts, len(rows)), changed


def _sample_rows(
    logprobs: mx.array, reference: mx.array | None, row: Row
) -> tuple[mx.array, mx.array]:
    n = logprobs.shape[0]
    if row.sampler is None:
        tokens = greedy(logprobs)
        other = greedy(reference) if reference is not None else tokens
    elif row.keyed is not None:
        row.random_key, key = mx.random.split(row.random_key)
        tokens = row.keyed(logprobs, key)
        other = row.keyed(reference, key) if reference is not None else tokens
    elif reference is None or row.plan.sampler is not None:
        tokens = row.sampler(logprobs)
        if reference is not None:  # a caller's sampler: its draw cannot be replayed
            return tokens, mx.full((n,), -1, dtype=mx.int32)
        other = tokens
    else:
        # The options' sampler, drawn from a key taken from MLX's random state so that
        # the reference logits can be drawn again with the same noise.
        keyed = row.plan.options.keyed_sampler()
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        tokens, other = keyed(logprobs, key), keyed(reference, key)
    return tokens, (tokens != other).astype(mx.int32)
