"""The generation thread: every MLX call of the server happens here.

The event loop parses and validates a request, then :meth:`Engine.submit`-s a
:class:`Job`; this thread admits waiting jobs into continuous batches (one
:class:`~layerdecode.live.LiveBatch` per strategy and sampling options, stepped in turn),
and hands each token back to the job's asyncio queue. MLX streams are bound to the thread
that made them, so no other thread touches the model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .. import ConfigError, GenerationOptions, LiveBatch, ResolvedStrategy
from .schemas import ApiError

log = logging.getLogger("layerdecode.serve")
_ids = itertools.count(1)


@dataclass
class TokenEvent:
    """One generated token as the HTTP side sees it (plain Python values)."""

    text: str
    token: int
    layer: int
    entropy: float
    finish_reason: str | None
    prompt_tokens: int
    num_layers: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    reasoning: str = ""
    part: str = "answer"


@dataclass(eq=False)
class Job:
    """One request: prompt ids, resolved strategy and options, and where tokens go."""

    prompt: list[int]
    model: str
    resolved: ResolvedStrategy
    options: GenerationOptions
    logprobs: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    done: bool = False

    def key(self) -> str:
        """Jobs with equal keys share a batch: the same strategy and sampling options."""
        sampling = self.options.set_values()
        sampling.pop("max_tokens", None)
        sampling.pop("stop", None)
        return json.dumps(
            [self.model, self.resolved.label, self.resolved.strategy.resolved_params(), sampling],
            sort_keys=True,
            default=str,
        )

    def send(self, item: TokenEvent | ApiError) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    """Owns the models and the generation thread; jobs wait in a bounded queue.

    ``models`` maps each served model's id to its ``(model, tokenizer)``; the first is the
    default.
    """

    def __init__(
        self, models: dict[str, tuple[Any, Any]], *, max_batch: int = 16, max_queue: int = 64
    ) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = dict(models)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.running: dict[int, tuple[Job, str]] = {}
        self.batches: dict[str, LiveBatch] = {}
        self.lock = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="layerdecode-generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already admitted or waiting, then end the thread."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue is a 429 with ``Retry-After``."""
        with self.lock:
            if self.stopping:
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
        """The client went away: the job's row leaves its batch at the next step."""
        job.cancelled = True

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.running and not self.stopping:
                    self.lock.wait(0.5)
                if self.stopping and not self.waiting and not self.running:
                    return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                for job in admitted:
                    self._admit(job)
                self._drop_cancelled()
                for key in list(self.batches):
                    self._step(key)
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the thread
                log.exception("the generation loop failed")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        for job, _ in self.running.values():
            job.send(ApiError(500, f"Generation failed: {error}", kind="server_error"))
        self.running.clear()
        self.batches.clear()

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        key = job.key()
        try:
            batch = self.batches.get(key)
            if batch is None:
                model, tokenizer = self.models[job.model]
                batch = LiveBatch(model, tokenizer, job.resolved, job.options)
                self.batches[key] = batch
            batch.add(
                job.id,
                job.prompt,
                max_tokens=job.options.max_tokens_or_default(),
                stop=job.options.stop_sequences,
                logprobs=job.logprobs,
            )
        except ConfigError as e:
            job.send(ApiError(400, str(e), param="strategy_params"))
            return
        except Exception as e:  # noqa: BLE001 - one request fails, the server lives on
            log.exception("could not start a generation")
            job.send(ApiError(500, f"Generation failed: {e}", kind="server_error"))
            return
        self.running[job.id] = (job, key)

    def _drop_cancelled(self) -> None:
        for job, key in list(self.running.values()):
            if job.cancelled:
                self.batches[key].cancel(job.id)
                del self.running[job.id]

    def _step(self, key: str) -> None:
        batch = self.batches[key]
        try:
            responses = batch.step()
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("generation failed")
            del self.batches[key]
            for job, job_key in list(self.running.values()):
                if job_key == key:
                    del self.running[job.id]
                    job.send(ApiError(500, f"Generation failed: {e}", kind="server_error"))
            return
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, TokenEvent]]] = {}
        for item in responses:
            entry = self.running.get(item.key)
            if entry is None:
                continue
            job, r = entry[0], item.response
            event = TokenEvent(
                r.text,
                r.token,
                r.layer,
                r.entropy,
                r.finish_reason,
                r.prompt_tokens,
                r.num_layers,
                item.logprob,
                item.top,
                r.reasoning,
                r.part,
            )
            outbox.setdefault(job.loop, []).append((job, event))
            if r.finish_reason is not None:
                del self.running[item.key]
        for loop, items in outbox.items():  # one wake-up of the event loop per step
            loop.call_soon_threadsafe(_deliver, items)
        if len(batch) == 0:
            del self.batches[key]


def _deliver(items: list[tuple[Job, TokenEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
