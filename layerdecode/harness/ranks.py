"""lm-eval requests shared across the ranks of an ``mlx.launch`` job.

As with ``mlx_lm.evaluate``, lm-eval sees one process on every rank (rank 0 of 1): each rank
builds every request, the model computes its share of them, and every rank gets all the
results back in request order, so each rank's lm-eval computes the same metrics from the
same numbers. Work is dealt out in rounds of one chunk per rank, a chunk being what one
process batches together, so the ranks run exactly the batches one process would (the same
numbers, to the last bit) and a wait for the others lasts at most one chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from layerdecode.distributed import ProcessGroup, init
from layerdecode.errors import ConfigError, LayerdecodeError

__all__ = ["join", "shared"]

Chunk = TypeVar("Chunk")


def join() -> ProcessGroup:
    """This process's group: the ranks of a data-parallel job, or a single process."""
    group = init()
    if group.tensor:
        raise ConfigError(
            "the lm-eval model splits the requests across ranks, each holding the whole "
            "model; a model split across ranks is not supported here: unset "
            "LAYERDECODE_DISTRIBUTED (or set it to data)"
        )
    return group


def _digest(requests: Sequence[Any]) -> str:
    text = json.dumps([list(r.args) for r in requests], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def shared(
    group: ProcessGroup,
    requests: Sequence[Any],
    chunks: Sequence[Chunk],
    compute: Callable[[Chunk], list[Any]],
    what: str,
) -> list[list[Any]]:
    """``compute(chunk)`` for every chunk, in chunk order, on every rank; each rank computes
    its share. Results travel as JSON, so tuples come back as lists."""
    if group.shares == 1:
        return [compute(chunk) for chunk in _progress(chunks, what)]
    # Every rank must deal out the same chunks, or the rounds would not line up.
    mine = json.dumps([len(chunks), _digest(requests)])
    if len(set(group.exchange(mine.encode()))) > 1:
        raise LayerdecodeError(
            f"rank {group.rank}: the ranks were given different {what} requests; run the "
            "same tasks, limit and seed on every rank, without lm-eval's --use_cache"
        )
    out: list[list[Any]] = [[] for _ in chunks]
    rounds = range(0, len(chunks), group.shares)
    for first in _progress(rounds, what, shown=group.is_main):
        index = first + group.share
        result = compute(chunks[index]) if index < len(chunks) else []
        payloads = group.exchange(json.dumps(result).encode())
        for rank, payload in enumerate(payloads):
            if first + rank < len(chunks):
                out[first + rank] = json.loads(payload)
    return out


def _progress(items: Sequence[Any], what: str, shown: bool = True) -> Any:
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc=f"layerdecode {what}", disable=len(items) < 2 or not shown)
