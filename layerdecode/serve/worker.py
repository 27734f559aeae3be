"""The generation thread: every MLX call of the server happens here.

The event loop parses and validates a request, then :meth:`Worker.submit`-s a :class:`Job`;
this thread adds waiting jobs as rows of the served model's one
:class:`~layerdecode.engine.Engine` (whatever their strategy and sampling options: they share
every forward pass), steps it, and hands each token back to the job's asyncio queue. MLX
streams are bound to the thread that made them, so no other thread touches the model.

The event loop may end a job at any time (its client left, it waited too long, the drain's
time ran out): the job is marked, leaves the queue at once, and its row leaves the engine
after the step running now, so a long prefill is given up between two of its chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import ResolvedStrategy
from ..engine import Engine, LogitsProcessor, Plan, TokenEvent
from ..errors import ConfigError
from ..options import GenerationOptions
from .limits import context_length
from .prompt_cache import PromptCache
from .schemas import ApiError

log = logging.getLogger("layerdecode.serve")
_ids = itertools.count(1)


@dataclass
class PromptScores:
    """The prompt's tokens scored under the request's strategy (``echo`` with logprobs):
    the first token has no log-probability."""

    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]


@dataclass(eq=False)
class Job:
    """One request: prompt ids, resolved strategy and options, and where tokens go.

    ``n`` samples decode the prompt (one prefill); their events carry ``(job id, index)``
    as their row. ``processors`` gives each sample its own logits processors (a grammar
    keeps per-row state). ``echo``: score the prompt first, with that many alternatives.
    """

    prompt: list[int]
    model: str
    resolved: ResolvedStrategy
    options: GenerationOptions
    logprobs: int | None
    loop: asyncio.AbstractEventLoop
    n: int = 1
    processors: list[tuple[LogitsProcessor, ...]] = field(default_factory=list)
    echo: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its answer is over: the engine drops its row, no more events
    left: int = 0  # samples still generating (the generation thread's count)
    ended: int = 0  # samples whose last token the event loop has received

    @property
    def finished(self) -> bool:
        return self.ended >= self.n

    def plans(self) -> list[Plan]:
        """One plan per sample: a seeded request's samples draw from seed, seed + 1..."""
        plans = []
        for i in range(self.n):
            options = self.options
            if i and options.seed is not None:
                options = GenerationOptions.build(options, seed=options.seed + i)
            processors = self.processors[i] if i < len(self.processors) else ()
            plans.append(
                Plan(self.resolved, options, logits_processors=processors, logprobs=self.logprobs)
            )
        return plans

    def row_keys(self) -> list[tuple[int, int]]:
        return [(self.id, i) for i in range(self.n)]

    def send(self, item: TokenEvent | ApiError) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """Owns the models, their engines and the generation thread; jobs wait in a bounded queue.

    ``models`` maps each served model's id to its ``(model, tokenizer)``; the first is the
    default. At most ``max_batch`` jobs generate at once, over all models. A job that waits
    in the queue longer than ``queue_timeout`` seconds (``None``: no limit) is ended by
    :meth:`expire`; ``prefill_step_size`` is the engines' prompt tokens per forward pass
    (default: :func:`default_prefill_step`).
    Finished requests' caches are kept in ``prompt_cache`` for later prompts that share a
    prefix; ``engine_options`` go to each :class:`~layerdecode.engine.Engine`.
    """

    def __init__(
        self,
        models: dict[str, tuple[Any, Any]],
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        queue_timeout: float | None = None,
        prefill_step_size: int | None = None,
        prompt_cache: PromptCache | None = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = dict(models)
        self.contexts = {name: context_length(model) for name, (model, _) in models.items()}
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.prefill_step_size = prefill_step_size or default_prefill_step()
        self.prompt_cache = prompt_cache or PromptCache(0)
        self.engine_options = engine_options or {}  # kv_bits...
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}
        self.engines: dict[str, Engine] = {}
        self.lock = threading.Condition()
        self.draining = False  # no new jobs; those in flight go on
        self.stopping = False  # the thread ends once it holds no job
        self.thread = threading.Thread(target=self._run, name="layerdecode-generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new job, let those in flight finish for at most ``timeout`` seconds (``None``:
        as long as they take), end the rest with a 503, then end the thread."""
        self.drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        self.abandon("The server is shutting down: this request was ended unfinished.")
        with self.lock:
            self.stopping = True
            self.lock.notify()
        # The thread may be inside one long MLX call; it is a daemon and owes no answer now.
        self.thread.join(1.0)

    def drain(self) -> None:
        """Refuse new jobs from now on (503); the jobs in flight go on."""
        with self.lock:
            self.draining = True

    def idle(self) -> bool:
        """No job is owed an answer (a cancelled row may still be leaving its engine)."""
        with self.lock:
            return not self.waiting and all(job.cancelled for job in self.running.values())

    def abandon(self, message: str) -> int:
        """End every job in flight with a 503 saying ``message``; returns how many there were.

        Safe from the event loop while this thread is busy: the rows leave the engines at
        the thread's next turn, and their clients have their answer now.
        """
        with self.lock:
            jobs = [*self.waiting, *self.running.values()]
            self.waiting.clear()
            for job in jobs:
                if not job.cancelled:
                    job.cancelled = True
                    job.send(ApiError(503, message, kind="server_error"))
            self.lock.notify()
        return len(jobs)

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue is a 429 with ``Retry-After``."""
        with self.lock:
            if self.draining or self.stopping:
                raise ApiError(503, "The server is shutting down.", kind="server_error")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(
                    429,
                    f"The server is busy: {len(self.waiting)} requests are waiting. "
                    "Retry in a moment.",
                    kind="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running one's row
        leaves its engine after the step (or prefill chunk) running now."""
        with self.lock:
            job.cancelled = True
            if job.id not in self.running and job in self.waiting:
                self.waiting.remove(job)
            self.lock.notify()

    def expire(self, job: Job) -> bool:
        """End ``job`` if it has waited in the queue longer than ``queue_timeout``."""
        if self.queue_timeout is None:
            return False
        with self.lock:
            if job not in self.waiting or self.waited(job) < self.queue_timeout:
                return False
            self.waiting.remove(job)
            job.cancelled = True
            return True

    def queue_left(self, job: Job) -> float | None:
        """Seconds ``job`` may still wait in the queue (``None``: not waiting, or no limit)."""
        if self.queue_timeout is None:
            return None
        with self.lock:
            if job not in self.waiting:
                return None
        return max(0.0, self.queue_timeout - self.waited(job)) + 0.01

    def waited(self, job: Job) -> float:
        return time.monotonic() - job.submitted

    def stats(self) -> dict[str, Any]:
        """Jobs running and waiting, and the age in seconds of the oldest of them."""
        with self.lock:
            jobs = [*self.waiting, *self.running.values()]
            waiting = len(self.waiting)
        oldest = max((self.waited(job) for job in jobs), default=0.0)
        return {
            "running": len(jobs) - waiting,
            "waiting": waiting,
            "oldest_age_s": round(oldest, 1),
            "prompt_cache": self.prompt_cache.stats(),
        }

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.running and not self.stopping:
                    self.lock.wait(0.5)
                if self.stopping and not self.waiting and not self.running:
                    return
                admitted = []
                while self.waiting and len(self.running) < self.max_batch:
                    job = self.waiting.popleft()
                    self.running[job.id] = job  # counted as running from here on
                    admitted.append(job)
            try:
                for job in admitted:
                    self._admit(job)
                self._drop_cancelled()
                for name in list(self.engines):
                    self._step(name)
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the thread
                log.exception("the generation loop failed")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            jobs = list(self.running.values())
            self.running.clear()
        for job in jobs:
            job.send(ApiError(500, f"Generation failed: {error}", kind="server_error"))
        self.engines.clear()

    def _engine(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            model, tokenizer = self.models[name]
            engine = self.engines[name] = Engine(
                model, tokenizer, prefill_step_size=self.prefill_step_size, **self.engine_options
            )
        return engine

    def _admit(self, job: Job) -> None:
        error = None
        if not job.cancelled:
            try:
                engine = self._engine(job.model)
                if job.echo is not None and job.logprobs is not None:
                    job.send(score_prompt(engine, job))
                cache, cached = self.prompt_cache.fetch(job.model, job.prompt)
                model = job.model

                def keep(tokens: list[int], kept: list[Any]) -> None:
                    self.prompt_cache.keep(model, tokens, kept)

                job.left = job.n
                engine.add_samples(job.prompt, job.plans(), job.row_keys(), prompt_cache=cache,
                                   cached=cached, on_cache=keep)  # fmt: skip
                return
            except ConfigError as e:
                error = ApiError(400, str(e), param="strategy_params")
            except Exception as e:  # noqa: BLE001 - one request fails, the server lives on
                log.exception("could not start a generation")
                error = ApiError(500, f"Generation failed: {e}", kind="server_error")
        self._finish(job)
        if error is not None:
            job.send(error)

    def _finish(self, job: Job) -> None:
        with self.lock:
            self.running.pop(job.id, None)

    def _drop_cancelled(self) -> None:
        with self.lock:
            cancelled = [job for job in self.running.values() if job.cancelled]
        for job in cancelled:
            engine = self.engines.get(job.model)
            if engine is not None:
                for key in job.row_keys():
                    engine.cancel(key)
            self._finish(job)

    def _step(self, name: str) -> None:
        engine = self.engines[name]
        try:
            events = engine.step()
        except Exception as e:  # noqa: BLE001 - fail this model's requests, keep serving
            log.exception("generation failed")
            del self.engines[name]
            for job in list(self.running.values()):
                if job.model == name:
                    self._finish(job)
                    job.send(ApiError(500, f"Generation failed: {e}", kind="server_error"))
            return
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, TokenEvent]]] = {}
        for event in events:
            job = self.running.get(event.row[0])
            if job is None or job.cancelled:
                continue
            event.logprobs = None  # the HTTP side reads plain values only
            outbox.setdefault(job.loop, []).append((job, event))
            if event.finish_reason is not None:
                job.left -= 1
                if not job.left:
                    self._finish(job)
        for loop, items in outbox.items():  # one wake-up of the event loop per step
            loop.call_soon_threadsafe(_deliver, items)


def default_prefill_step() -> int:
    """2048 prompt tokens per chunk on a GPU (mlx_lm.server's), 512 on the CPU, where a chunk
    of 2048 holds the running streams for about a minute."""
    import mlx.core as mx

    return 512 if mx.default_device() == mx.cpu else 2048


def score_prompt(engine: Engine, job: Job) -> PromptScores:
    """The prompt's tokens scored with the distribution the job's strategy decodes from."""
    import mlx.core as mx

    from ..events import top_logprobs
    from ..harness.scoring import PositionScorer

    scorer = PositionScorer(engine.model, job.resolved.strategy)
    tokens = job.prompt
    logprobs: list[float | None] = [None]
    tops: list[list[tuple[int, float]]] = [[]]
    if len(tokens) > 1:
        passed = scorer.forward(mx.array(tokens)[None])
        for start in range(0, len(tokens) - 1, scorer.chunk):
            positions = list(range(start, min(start + scorer.chunk, len(tokens) - 1)))
            view = scorer.view(passed, mx.zeros(len(positions), dtype=mx.int32),
                               mx.array(positions))  # fmt: skip
            scores = scorer.logprobs(view)
            targets = mx.array([tokens[p + 1] for p in positions])
            picked, _ = scorer.pick(scores, targets)
            mx.eval(picked, scores)
            logprobs += picked.tolist()
            tops += [top_logprobs(scores[i], job.echo or 0) for i in range(len(positions))]
    return PromptScores(list(tokens), logprobs, tops)


def _deliver(items: list[tuple[Job, TokenEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
