"""What goes into the decoding engine and what comes out of it.

A :class:`Plan` says how one row decodes (strategy, sampling, processors, stop rules,
budget); a :class:`TokenEvent` is one generated token of one row, as every face sees it:
the Python API, the command line, eval and the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import mlx.core as mx

from .config import ResolvedStrategy
from .options import GenerationOptions
from .reasoning import ANSWER

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class Plan:
    """How one row decodes.

    Attributes:
        strategy: the resolved strategy (its params included).
        options: sampling and penalty options, ``max_tokens``, ``stop`` sequences and
            ``seed`` (a seeded row draws from its own key: the same tokens alone or batched).
        sampler: an mlx-lm sampler that replaces the one the options make.
        logits_processors: mlx-lm processors, applied before the options' own.
        stop_tokens: token ids that end the row (default: the tokenizer's end of sequence).
        logprobs: how many most likely tokens to report with each token (``None``: none).
        candidates: report the entropy of every candidate layer the strategy read, per
            token (for traces; read back from the device each step).
    """

    strategy: ResolvedStrategy
    options: GenerationOptions = field(default_factory=GenerationOptions)
    sampler: Sampler | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()
    stop_tokens: tuple[int, ...] | None = None
    logprobs: int | None = None
    candidates: bool = False

    def strategy_key(self) -> str:
        """Rows whose keys are equal share one strategy object and one ``select``."""
        strategy = self.strategy.strategy
        kind = f"{type(strategy).__module__}.{type(strategy).__qualname__}"
        return json.dumps([kind, strategy.resolved_params()], sort_keys=True, default=str)

    def sampling_key(self) -> str | None:
        """Rows whose keys are equal may be sampled together (``None``: on their own)."""
        if self.sampler is not None or self.options.seed is not None:
            return None
        values = self.options.set_values()
        return json.dumps({k: values.get(k) for k in ("temp", "top_p", "min_p", "top_k")})


@dataclass
class TokenEvent:
    """One generated token of one row: where it came from, its text, and the row's state.

    Attributes:
        row: the row's key (its index in a batch, or the key it was added with).
        token: the token id.
        layer: 0-based decoder layer the token was decoded from (final: ``num_layers - 1``).
        entropy: entropy in nats of that layer's distribution at this step.
        extras: strategy-specific per-token facts (DoLa: ``premature_layer``).
        logprobs: the log-probabilities the token was sampled from, ``(vocab,)``.
        text: the next segment of the answer text (may be empty).
        reasoning: the next segment of the reasoning text (thinking models; may be empty).
        part: ``"reasoning"`` for a token of the reasoning or its markers, else ``"answer"``.
        finish_reason: ``"stop"``, ``"length"``, ``"cancelled"`` or ``None`` before the
            row's last token.
        matched_stop: the stop sequence that ended the row, if one did.
        num_layers: decoder layers of the model.
        prompt_tokens: the row's prompt tokens.
        cached_tokens: those of them a reused prompt cache held already (not prefilled).
        prompt_tps: prompt tokens per second of the prefill the row was part of.
        generation_tokens: tokens the row has generated so far.
        generation_tps: the row's tokens per second since its prefill ended.
        peak_memory: peak memory so far, in GB.
        logprob: the token's log-probability, when the plan asked for ``logprobs``.
        top_logprobs: the plan's ``logprobs`` most likely ``(token, logprob)``, most likely
            first.
        in_output: ``False`` for the end-of-sequence (or stop) token that ended the row: it
            is not part of the output, its text or its token counts.
        changed: whether the token differs from the one the final layer alone would give,
            under the same processors, sampler and random draw (``False`` for ``final``;
            ``None`` with a caller's own sampler, whose draw cannot be replayed).
        head_rows: vocabulary-head rows the step cost this row (the final layer's included:
            1 for ``final``).
        candidates: the entropy of each candidate layer the strategy read (layer -> nats),
            when the plan asked for them; else empty.
    """

    row: Hashable
    token: int
    layer: int
    entropy: float
    extras: dict[str, int]
    logprobs: mx.array
    text: str = ""
    reasoning: str = ""
    part: str = ANSWER
    finish_reason: str | None = None
    matched_stop: str | None = None
    num_layers: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    in_output: bool = True
    changed: bool | None = False
    head_rows: int = 1
    candidates: dict[int, float] = field(default_factory=dict)


def top_logprobs(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one row's log-probabilities, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.size)
    ids = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[ids]
    pairs = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda p: -p[1])
    return [(int(i), float(v)) for i, v in pairs]
