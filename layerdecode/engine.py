"""The decoding engine: one loop over the model for every face.

An :class:`Engine` owns a model's caches and its live rows. Each row carries its
:class:`Plan`: the strategy (and params), the sampling options, logits processors, stop
rules, token budget and its own random key. Every step runs **one** forward pass for all
live rows, with the decoder layers tapped; then each strategy's ``select`` once, over a view
of the rows that share it; then the processors and the sampler of each row. Rows join
(prefilled together, then merged into the running caches, which only adds masked padding)
and leave between steps. The step for the rows running now is scheduled before the previous
one is read (``mx.async_eval``), as in mlx-lm's own loop, unless a strategy declares that it
synchronises with the host.

Single-stream generation is an engine with one row; ``batch_generate``, ``eval``,
``compare``, the lm-eval model and the server drive the same engine. Every token comes out
as one :class:`TokenEvent`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import PromptProcessingBatch, generation_stream, maybe_quantize_kv_cache
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache

from .adapters import get_adapter
from .errors import ConfigError
from .events import LogitsProcessor, Plan, Sampler, TokenEvent, top_logprobs
from .fastmath import log_softmax
from .rows import Group, Row, RowsCapture, Step, in_row_order, others, scatter
from .sampling import process, sample
from .strategy import Decision, model_facts
from .taps import install_taps
from .text import OutputStream
from .view import LayerView

__all__ = ["Engine", "LogitsProcessor", "Plan", "Sampler", "TokenEvent", "remove_taps"]

# -- the engine ------------------------------------------------------------------------------

_keys = itertools.count()


class Engine:
    """A model's caches and live rows; :meth:`step` advances every row by one token.

    Args:
        model: an mlx-lm model (any architecture :func:`~layerdecode.adapters.get_adapter`
            accepts).
        tokenizer: an mlx-lm ``TokenizerWrapper``; without one, rows end at their
            ``stop_tokens`` or budget and events carry no text.
        prefill_step_size: prompt tokens per forward pass while prefilling.
        max_kv_size: a rotating cache of that many positions per row (as in mlx-lm).
        kv_bits: quantise the caches to this many bits once they hold
            ``quantized_kv_start`` tokens, in groups of ``kv_group_size`` (mlx-lm's
            quantised cache). Such caches cannot be batched: rows then run one at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        prefill_step_size: int = 2048,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 5000,
    ) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.taps = install_taps(self.adapter.layers, self.adapter.hidden_of)
        self.facts = model_facts(self.adapter)
        self.tokenizer = tokenizer
        self.prefill_step_size = prefill_step_size
        self.max_kv_size = max_kv_size
        # mlx-lm's quantised caches cannot be batched: with them, rows run one at a time.
        self.quantize = None
        if kv_bits is not None:
            self.quantize = functools.partial(
                maybe_quantize_kv_cache,
                quantized_kv_start=quantized_kv_start,
                kv_group_size=kv_group_size,
                kv_bits=kv_bits,
            )
        self.groups: dict[str, Group] = {}
        self.waiting: list[Row] = []
        self.prefilling: Row | None = None  # a long prompt, prefilled a chunk per step
        self.yielded = False  # the last step left the long prompt for short ones
        self.rows: list[Row] = []  # the rows of ``upcoming``, in cache order
        self.cache: list[Any] | None = None
        self.batched = False  # the caches are mlx-lm's batch caches
        self.upcoming: Step | None = None
        self.steps = 0

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    # -- rows ----------------------------------------------------------------------------

    def add(
        self,
        prompt: Sequence[int],
        plan: Plan,
        *,
        key: Hashable | None = None,
        prompt_cache: list[Any] | None = None,
        cached: int = 0,
        on_cache: Callable[[list[int], list[Any]], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Hashable:
        """Queue a row; it is prefilled and generates from the next :meth:`step` on.

        Args:
            prompt: the prompt's token ids (at least one).
            plan: how the row decodes.
            key: the row's key in its events (default: a new integer).
            prompt_cache: a cache from ``make_prompt_cache`` to fill and reuse: the row's
                prompt is processed into it (after what it holds already). It keeps
                receiving the row's tokens while the row runs alone.
            cached: how many of the prompt's first tokens ``prompt_cache`` holds already
                (a reused prefix: only the rest is prefilled; at most ``len(prompt) - 1``).
            on_cache: called once the row has ended (not cancelled) with the tokens its
                caches hold (the prompt, then the generated tokens fed back) and those
                caches, as mlx-lm's plain caches: to keep them for a later prompt.
            progress: called with (processed, total) prompt tokens while prefilling.

        Returns:
            The row's key.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ConfigError("The prompt is empty: give at least one token.")
        if not 0 <= cached < len(prompt) or (cached and prompt_cache is None):
            raise ConfigError(
                f"cached={cached}: a prompt cache may hold 0 to {len(prompt) - 1} of the "
                "prompt's tokens (the last one is always decoded)."
            )
        options = plan.options
        max_tokens = options.max_tokens_or_default()
        if max_tokens == 0:
            raise ConfigError("max_tokens must be positive (-1: no limit).")
        group = self._group(plan)
        processors = [*plan.logits_processors, *options.logits_processors()]
        sampler = plan.sampler or options.sampler()
        keyed = None
        random_key = None
        if plan.sampler is None and options.seed is not None and sampler is not None:
            keyed, random_key = options.keyed_sampler(), mx.random.key(options.seed)
        stop = plan.stop_tokens
        if stop is None:
            stop = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        output = None
        if self.tokenizer is not None:
            output = OutputStream(
                self.tokenizer,
                max_tokens=max_tokens,
                stop=options.stop_sequences,
                prompt=prompt,
                eos=stop,
            )
        row = Row(
            key=next(_keys) if key is None else key,
            prompt=prompt,
            plan=plan,
            group=group,
            state=group.strategy.new_state(options.seed),
            sampler=sampler,
            keyed=keyed,
            random_key=random_key,
            processors=processors,
            history=TokenBuffer(prompt[:-1]) if processors else None,
            output=output,
            max_tokens=max_tokens,
            stop_tokens=frozenset(stop),
            prompt_cache=prompt_cache,
            cached=cached,
            on_cache=on_cache,
            progress=progress,
        )
        self.waiting.append(row)
        return row.key

    def add_samples(
        self, prompt: Sequence[int], plans: Sequence[Plan], keys: Sequence[Hashable], **kwargs
    ) -> None:
        """Queue one row per plan for the same prompt, prefilled once (``n`` samples).

        ``kwargs`` are :meth:`add`'s; the rows start together, each on a copy of the
        prompt's caches.
        """
        if len(plans) != len(keys) or not plans:
            raise ConfigError("Give one key per plan, and at least one plan.")
        if self.quantize is not None:  # quantised caches run one row at a time
            progress = kwargs.pop("progress", None)
            for i, (plan, key) in enumerate(zip(plans, keys, strict=True)):
                self.add(prompt, plan, key=key, progress=progress, **(kwargs if not i else {}))
            return
        self.add(prompt, plans[0], key=keys[0], **kwargs)
        lead = self.waiting[-1]
        for plan, key in zip(plans[1:], keys[1:], strict=True):
            self.add(prompt, plan, key=key, progress=None)
            lead.twins.append(self.waiting.pop())

    def _group(self, plan: Plan) -> Group:
        key = plan.strategy_key()
        group = self.groups.get(key)
        if group is None:
            # Groups no row uses any more are dropped first: a server that sees many
            # strategies keeps only those of its live rows.
            rows = [*self.waiting, *([self.prefilling] if self.prefilling else [])]
            rows += [t for r in rows for t in r.twins] + self.rows
            live = {id(r.group) for r in rows if not r.done}
            self.groups = {k: g for k, g in self.groups.items() if id(g) in live}
            group = self.groups[key] = Group(plan.strategy.strategy, self.facts)
        return group

    def cancel(self, key: Hashable) -> None:
        """End a row (its client went away): it leaves before the next step."""
        self.waiting = [r for r in self.waiting if r.key != key]
        for row in [*self.waiting, *([self.prefilling] if self.prefilling else [])]:
            row.twins = [t for t in row.twins if t.key != key]
        if self.prefilling is not None and self.prefilling.key == key:
            self.prefilling = None  # its partial caches go with it
            mx.clear_cache()
        for row in self.rows:
            if row.key == key:
                row.done = row.cancelled = True

    def __len__(self) -> int:
        """Rows waiting, being prefilled or generating."""
        queued = [*self.waiting, *([self.prefilling] if self.prefilling else [])]
        return sum(1 + len(r.twins) for r in queued) + sum(not r.done for r in self.rows)

    def run(self) -> Iterator[list[TokenEvent]]:
        """Step until every row has ended; one list of events per step."""
        while len(self):
            events = self.step()
            if events:
                yield events

    # -- one step ------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One token for every running row (rows added now answer at the next step)."""
        current, rows = self._settle()
        if current is None:
            if not self.waiting and self.prefilling is None:
                return []
            current = self._build(None)
            if current is None:  # a chunk of a long prompt; nothing to decode yet
                return []
            rows = list(self.rows)
        ending = all(r.budget_ends_next() for r in rows)
        joining = [*self.waiting, *([self.prefilling] if self.prefilling else [])]
        follow = joining or not ending
        syncs = any(r.group.strategy.host_sync for r in [*rows, *joining])
        if follow and not syncs:
            self.upcoming = self._build(current.tokens)
        events = self._read(current, rows)
        if follow and syncs:
            # The strategy reads values on the host while it selects: read this step
            # first, so that the finished rows are not decoded again.
            self.upcoming = self._build(current.tokens)
        self._hand_back_caches()
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()
        return events

    def _settle(self) -> tuple[Step | None, list[Row]]:
        current, self.upcoming = self.upcoming, None
        if current is None:
            self.rows, self.cache, self.batched = [], None, False
            return None, []
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if not keep:
            return self._settle()  # nothing left: start afresh
        if len(keep) < len(self.rows):
            index = mx.array(keep)
            for c in self.cache or ():
                c.filter(index)
            self.rows = [self.rows[i] for i in keep]
            current = current.take(keep)
        return current, list(self.rows)

    def _hand_back_caches(self) -> None:
        """The caches of rows that ended, to those who asked for them (before they go)."""
        for i, row in enumerate(self.rows):
            if row.done and not row.cancelled and row.on_cache is not None:
                callback, row.on_cache = row.on_cache, None
                if self.batched:
                    cache = [c.extract(i) for c in self.cache]
                else:
                    cache, self.cache = self.cache, None  # the row ran alone: its own caches
                tokens = [*row.prompt, *row.generated][: row.fed]
                callback(tokens, cache)

    def _build(self, tokens: mx.array | None) -> Step | None:
        """The next step of the running rows and of those whose prefill ends now."""
        if self.waiting or self.prefilling is not None:
            joined = self._admit()
            if joined:
                last = mx.array([r.prompt[-1] for r in joined], dtype=mx.uint32)
                tokens = last if tokens is None else mx.concatenate([tokens, last])
        if tokens is None:
            return None
        out = self._decide(tokens)
        if self.quantize is not None:
            self.quantize(self.cache)
        for row in self.rows:
            row.fed += 1
        mx.async_eval(*out.arrays())
        return out

    # -- prefill -------------------------------------------------------------------------

    def _admit(self) -> list[Row]:
        """This step's share of prefill; the rows whose prompts are now in a cache.

        A prompt longer than ``prefill_step_size`` is prefilled alone, one chunk per step,
        long prompts first come first served. Shorter ones are prefilled together, up to
        ``prefill_step_size`` tokens per step while other rows run or a long prompt is in
        progress (all at once otherwise), and pass the long prompts: a step that prefills
        short ones skips the long prompt's chunk (never two steps running), so a short
        request waits for at most the chunk in progress, and the running streams for a
        chunk or a step's short prompts between two tokens.
        """
        step = self.prefill_step_size
        if self.quantize is not None and self.rows:
            return []  # quantised caches: the next row starts when this one ends
        budget = step if self.rows or self.prefilling is not None else None  # None: no limit
        # The short prompts first: one that came while a chunk was running waits no more.
        batch: list[Row] = []
        one_at_a_time = self.quantize is not None
        for row in list(self.waiting):
            if one_at_a_time and (batch or self.prefilling is not None):
                break
            need = len(row.prompt) - 1 - row.cached
            if need > step or (budget is not None and need > budget):
                continue
            if budget is not None:
                budget -= need
            self.waiting.remove(row)
            batch.append(row)
        ready: list[Row] = []
        if self.prefilling is None and not (one_at_a_time and batch):
            row = next((r for r in self.waiting if len(r.prompt) - 1 - r.cached > step), None)
            if row is not None:  # the next long prompt, in the order they came
                self.waiting.remove(row)
                self.prefilling = row
                self._start(row)
        # A step that prefills short prompts gives them the step's time; the long prompt
        # goes on at the next (every other step at least, whatever keeps coming).
        yields = bool(batch) and not self.yielded and self.prefilling is not None
        self.yielded = yields
        if self.prefilling is not None and not yields:
            row = self.prefilling
            self._chunk(row, step)
            if row.filled == len(row.prompt) - 1:
                ready.append(row)
                self.prefilling = None
        alone = [r for r in batch if r.prompt_cache is not None or r.twins]
        together = [r for r in batch if r not in alone]
        if len(together) == 1:
            alone, together = alone + together, []
        for row in alone:
            self._start(row)
            self._chunk(row, len(row.prompt))
        joined = []
        for row in [*ready, *alone]:  # samples of one prompt start on copies of its caches
            for twin in row.twins:
                twin.cache, twin.filled = copy.deepcopy(row.cache), row.filled
                twin.prefill_seconds = row.prefill_seconds
            joined += [row, *row.twins]
        caches = [(row.cache, False) for row in joined]
        if together:
            tic = time.perf_counter()
            caches.append((self._prefill_together(together), True))
            share = (time.perf_counter() - tic) / len(together)
            for row in together:
                row.prefill_seconds += share
            joined += together
        self._join(joined, caches)
        return joined

    def _start(self, row: Row) -> None:
        row.cache = row.prompt_cache or make_prompt_cache(self.model, self.max_kv_size)
        row.filled = row.cached
        if row.progress is not None:
            row.progress(0, len(row.prompt))

    def _chunk(self, row: Row, limit: int) -> int:
        """Prefill up to ``limit`` more of the row's prompt (never its last token)."""
        n = min(limit, len(row.prompt) - 1 - row.filled)
        if n <= 0:
            return 0
        tic = time.perf_counter()
        tokens = mx.array(row.prompt[row.filled : row.filled + n], dtype=mx.uint32)
        with mx.stream(generation_stream):
            self.model(tokens[None], cache=row.cache)
            if self.quantize is not None:
                self.quantize(row.cache)
            mx.eval([c.state for c in row.cache])
        row.filled += n
        row.prefill_seconds += time.perf_counter() - tic
        if row.progress is not None:
            row.progress(row.filled, len(row.prompt))
        mx.clear_cache()
        return n

    def _prefill_together(self, rows: list[Row]) -> list[Any]:
        """Prefill several prompts in one batch; their caches, as mlx-lm's batch caches."""
        model = self.model
        with mx.stream(generation_stream):
            prefill = PromptProcessingBatch(
                model,
                uids=list(range(len(rows))),
                caches=[make_prompt_cache(model, self.max_kv_size) for _ in rows],
                prefill_step_size=self.prefill_step_size,
            )
            if any(len(r.prompt) > 1 for r in rows):
                prefill.prompt([r.prompt[:-1] for r in rows])
        return prefill.prompt_cache

    def _join(self, joined: list[Row], caches: list[tuple[list[Any], bool]]) -> None:
        """The prefilled rows join the running ones.

        ``caches``: the joiners' caches in their order, each a row's plain caches or, marked
        ``True``, the batch caches of several rows prefilled together.
        """
        if not joined:
            return
        if not self.rows and len(joined) == 1:
            # A row running alone keeps mlx-lm's plain caches: exactly mlx-lm's own loop.
            self.cache, self.batched = caches[0][0], False
        else:
            merged = [c if batch else [x.merge([x]) for x in c] for c, batch in caches]
            if self.cache is None:
                self.cache, merged = merged[0], merged[1:]
            elif not self.batched:  # the row running alone joins mlx-lm's batch caches
                self.cache = [c.merge([c]) for c in self.cache]
            for theirs in merged:
                for mine, other in zip(self.cache, theirs, strict=True):
                    mine.extend(other)
            self.batched = True
        now = time.perf_counter()
        for row in joined:
            if self.batched:
                row.cache = None  # merged into the engine's caches
            row.prompt_tps = (len(row.prompt) - row.cached) / max(row.prefill_seconds, 1e-9)
            row.fed = len(row.prompt) - 1
            row.tic = now
            if row.progress is not None:
                row.progress(len(row.prompt), len(row.prompt))
        self.rows += joined

    # -- deciding ------------------------------------------------------------------------

    def _decide(self, tokens: mx.array) -> Step:
        """Forward pass for every row, each group's ``select``, processors, sampling."""
        rows = self.rows
        with mx.stream(generation_stream):
            with self.taps.capture() as capture:
                logits = self.model(tokens[:, None], cache=self.cache)
            final = logits[:, -1, :]
            groups: dict[int, tuple[Group, list[int]]] = {}
            for position, row in enumerate(rows):
                groups.setdefault(id(row.group), (row.group, []))[1].append(position)
            decided: list[tuple[list[int], Decision, mx.array]] = []
            references: list[tuple[list[int], mx.array]] = []
            for group, positions in groups.values():
                if len(positions) == len(rows):
                    view = LayerView(self.adapter, capture, final, group.exits)
                else:
                    index = mx.array(positions)
                    view = LayerView(
                        self.adapter, RowsCapture(capture, index), final[index], group.exits
                    )
                view.states = [rows[p].state for p in positions]
                decision = group.strategy.select(view)
                decided.append((positions, decision, view.head_rows()))
                # The final layer's logits, to tell whether the strategy changed the token
                # (read after the head rows are counted: the flag is not the strategy's cost).
                reference = decision.final
                if reference is None:
                    reference = view.logits(view.final_layer)
                if reference is not decision.logits:
                    references.append((positions, reference))
            logits, layers, entropy, head_rows = in_row_order(decided, len(rows))
            compared = [p for positions, _ in references for p in positions]
            reference = None
            if compared:
                # Rows compared with themselves (their strategy decodes the final layer) get
                # the same token twice: one sampling call for all rows keeps the draws equal.
                reference = scatter(
                    [*references, *[([p], logits[p : p + 1]) for p in others(compared, rows)]],
                    len(rows),
                )
            logits, reference = process(logits, reference, tokens, rows)
            logprobs = log_softmax(logits)
            sampled, changed = sample(logprobs, reference, rows)
        extras = [(positions, d.extras) for positions, d, _ in decided if d.extras]
        candidates = [
            (positions, d.candidate_layers, d.candidate_entropy)
            for positions, d, _ in decided
            if d.candidate_entropy is not None
        ]
        return Step(
            sampled, logprobs, layers, entropy, extras, changed, head_rows, candidates
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def _read(self, out: Step, rows: list[Row]) -> list[TokenEvent]:
        tokens, layers, entropies = out.tokens.tolist(), out.layers.tolist(), out.entropy.tolist()
        head_rows = out.head_rows.tolist()
        changed = [0] * len(rows) if out.changed is None else out.changed.tolist()
        extras: list[dict[str, int]] = [{} for _ in rows]
        for positions, arrays in out.extras:
            for name, values in arrays.items():
                for position, value in zip(positions, values.tolist(), strict=True):
                    extras[position][name] = value
        candidates: list[dict[int, float]] = [{} for _ in rows]
        for positions, cand_layers, values in out.candidates:
            if not any(rows[p].plan.candidates for p in positions):
                continue
            for position, row_values in zip(positions, values.tolist(), strict=True):
                candidates[position] = {
                    layer: value
                    for layer, value in zip(cand_layers, row_values, strict=True)
                    if value == value  # NaN: a layer this row did not read
                }
        peak = mx.get_peak_memory() / 1e9
        now = time.perf_counter()
        events = []
        for i, row in enumerate(rows):
            if row.done:  # cancelled while this step ran
                continue
            token = tokens[i]
            row.count += 1
            row.generated.append(token)
            event = TokenEvent(
                row=row.key,
                token=token,
                layer=layers[i],
                entropy=entropies[i],
                extras=extras[i],
                logprobs=out.logprobs[i],
                num_layers=self.num_layers,
                prompt_tokens=len(row.prompt),
                cached_tokens=row.cached,
                prompt_tps=row.prompt_tps,
                generation_tokens=row.count,
                generation_tps=row.count / max(now - row.tic, 1e-9),
                peak_memory=peak,
                changed=None if changed[i] < 0 else bool(changed[i]),
                head_rows=head_rows[i],
            )
            if row.plan.candidates:
                event.candidates = candidates[i] or {layers[i]: entropies[i]}
            if row.output is not None:
                released = row.output.feed(token)
                event.text, event.reasoning, event.part = released[:3]
                event.finish_reason = released.finish
                event.matched_stop = row.output.matched_stop
            elif token in row.stop_tokens:
                event.finish_reason = "stop"
            elif row.count == row.max_tokens:
                event.finish_reason = "length"
            if row.plan.logprobs is not None:
                event.logprob = float(out.logprobs[i, token].item())
                event.top_logprobs = top_logprobs(out.logprobs[i], row.plan.logprobs)
            event.in_output = not (
                event.finish_reason == "stop"
                and token in row.stop_tokens
                and event.matched_stop is None
            )
            row.done = event.finish_reason is not None
            events.append(event)
        return events


def remove_taps(model: nn.Module) -> None:
    """Give the model's decoder layers their own classes back.

    Decoding installs taps on the decoder layers once and leaves them (outside a step they
    only forward the call); after this the model is exactly as mlx-lm built it, and the next
    decoding call taps it again.
    """
    install_taps(get_adapter(model, verify=False).layers).remove()
