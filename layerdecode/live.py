"""Continuous batching: rows join and leave a running batch between steps (for the server).

:class:`LiveBatch` drives the same step factory as the other loops
(:class:`~layerdecode.decode.Decoder`); new rows are prefilled with mlx-lm's batch prefill
and merged into the running caches, which only adds masked padding, so a row's greedy
tokens equal its single run's. The step for the rows running now is scheduled before the
previous one is read, as in :func:`~layerdecode.decode.pipelined`; unlike there, rows
may also join between steps.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import PromptProcessingBatch, generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import ResolvedStrategy
from .decode import StepOutput, top_logprobs
from .errors import ConfigError
from .generation import LayerResponse, Step, make_decoder, make_response
from .options import GenerationOptions
from .text import OutputStream


@dataclass
class _LiveRow:
    key: Hashable
    prompt: list[int]
    output: OutputStream
    logprobs: int | None = None
    prompt_tps: float = 0.0
    tic: float = 0.0
    done: bool = False


class LiveToken(NamedTuple):
    """One token of one row of a :class:`LiveBatch`, with its log-probability if asked."""

    key: Hashable
    response: LayerResponse
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class LiveBatch:
    """Continuous batching: rows join and leave a running batch between steps.

    Every row shares one resolved strategy and one set of sampling options (one
    :class:`~layerdecode.decode.Decoder`); each has its own prompt, budget and stop
    sequences. A row added with :meth:`add` is prefilled and joins at the next step; a
    row that ended, or was :meth:`cancel`-ed, leaves before the next one. Joining only
    pads the caches (masked), so a row's greedy tokens equal its single run's.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        resolved: ResolvedStrategy,
        options: GenerationOptions,
        *,
        prefill_step_size: int = 2048,
    ) -> None:
        self.decoder = make_decoder(model, resolved, options)
        self.tokenizer = tokenizer
        self.prefill_step_size = prefill_step_size
        self.waiting: list[_LiveRow] = []
        self.rows: list[_LiveRow] = []  # the rows of ``upcoming``, in cache order
        self.cache: list[Any] | None = None
        self.histories: list[Any] = []
        self.upcoming: StepOutput | None = None
        self.steps = 0

    def add(
        self,
        key: Hashable,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
    ) -> None:
        """Queue a row; it starts at the next :meth:`step`; ``logprobs``: top-k to report."""
        if not prompt:
            raise ConfigError("The prompt is empty: give at least one token.")
        output = OutputStream(self.tokenizer, max_tokens=max_tokens, stop=stop, prompt=prompt)
        self.waiting.append(_LiveRow(key, list(prompt), output, logprobs))

    def cancel(self, key: Hashable) -> None:
        """End a row (e.g. its client went away); it stops costing compute at the next step."""
        self.waiting = [r for r in self.waiting if r.key != key]
        for row in self.rows:
            if row.key == key:
                row.done = True

    def __len__(self) -> int:
        return len(self.waiting) + sum(not r.done for r in self.rows)

    def step(self) -> list[LiveToken]:
        """One token for every running row (rows that joined now answer at the next step)."""
        current, rows = self._settle()
        if current is None:
            if not self.waiting:
                return []
            current = self._build(None)
            rows = list(self.rows)
        last = all(0 < r.output.max_tokens <= r.output.count + 1 for r in rows)
        if self.waiting or not last:
            self.upcoming = self._build(current.tokens)
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()
        return self._read(current, rows)

    def _settle(self) -> tuple[StepOutput | None, list[_LiveRow]]:
        current, self.upcoming = self.upcoming, None
        if current is None:
            self.rows, self.cache, self.histories = [], None, []
            return None, []
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if not keep:
            return self._settle()  # nothing left: start afresh
        if len(keep) < len(self.rows):
            index = mx.array(keep)
            for c in self.cache or ():
                c.filter(index)
            self.rows = [self.rows[i] for i in keep]
            self.histories = [self.histories[i] for i in keep] if self.histories else []
            current = current.take(index)
        return current, list(self.rows)

    def _build(self, tokens: mx.array | None) -> StepOutput:
        joiners, self.waiting = self.waiting, []
        if joiners:
            tic = time.perf_counter()
            model = self.decoder.model
            with mx.stream(generation_stream):
                prefill = PromptProcessingBatch(
                    model,
                    uids=list(range(len(joiners))),
                    caches=[make_prompt_cache(model) for _ in joiners],
                    prefill_step_size=self.prefill_step_size,
                )
                if any(len(r.prompt) > 1 for r in joiners):
                    prefill.prompt([r.prompt[:-1] for r in joiners])
            if self.cache is None:
                self.cache = prefill.prompt_cache
            else:
                for mine, theirs in zip(self.cache, prefill.prompt_cache, strict=True):
                    mine.extend(theirs)
            self.histories += self.decoder.histories([r.prompt[:-1] for r in joiners])
            now = time.perf_counter()
            for r in joiners:
                r.prompt_tps = sum(len(j.prompt) for j in joiners) / max(now - tic, 1e-9)
                r.tic = now
            last = mx.array([r.prompt[-1] for r in joiners], dtype=mx.uint32)
            tokens = last if tokens is None else mx.concatenate([tokens, last])
            self.rows += joiners
        out = self.decoder.step(tokens, self.cache, self.histories)
        mx.async_eval(*out.arrays())
        return out

    def _read(self, out: StepOutput, rows: list[_LiveRow]) -> list[LiveToken]:
        responses = []
        for i, (row, (token, layer, entropy, extras)) in enumerate(
            zip(rows, out.read(), strict=True)
        ):
            if row.done:  # cancelled while this step ran
                continue
            released = row.output.feed(token)
            row.done = released.finish is not None
            step = Step(token, layer, entropy, out.logprobs[i], extras)
            response = make_response(
                released,
                step,
                num_layers=self.decoder.num_layers,
                prompt_tokens=len(row.prompt),
                prompt_tps=row.prompt_tps,
                generated=row.output.count,
                tic=row.tic,
                matched_stop=row.output.matched_stop,
            )
            if row.logprobs is None:
                responses.append(LiveToken(row.key, response))
                continue
            chosen = float(step.logprobs[step.token].item())
            responses.append(
                LiveToken(row.key, response, chosen, top_logprobs(step.logprobs, row.logprobs))
            )
        return responses
