"""The generation thread: every MLX call of the server happens here.

The event loop parses and validates a request, then :meth:`Worker.submit`-s a :class:`Job`;
this thread adds waiting jobs as rows of the served model's one
:class:`~layerdecode.engine.Engine` (whatever their strategy and sampling options: they share
every forward pass), steps it, and hands each token back to the job's asyncio queue. MLX
streams are bound to the thread that made them, so no other thread touches the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import ResolvedStrategy
from ..engine import Engine, Plan, TokenEvent
from ..errors import ConfigError
from ..options import GenerationOptions
from .schemas import ApiError

log = logging.getLogger("layerdecode.serve")
_ids = itertools.count(1)


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

    def plan(self) -> Plan:
        return Plan(self.resolved, self.options, logprobs=self.logprobs)

    def send(self, item: TokenEvent | ApiError) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """Owns the models, their engines and the generation thread; jobs wait in a bounded queue.

    ``models`` maps each served model's id to its ``(model, tokenizer)``; the first is the
    default. At most ``max_batch`` jobs generate at once, over all models.
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
        self.running: dict[int, Job] = {}
        self.engines: dict[str, Engine] = {}
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
        """The client went away: the job's row leaves its engine at the next step."""
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
                for name in list(self.engines):
                    self._step(name)
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the thread
                log.exception("the generation loop failed")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        for job in self.running.values():
            job.send(ApiError(500, f"Generation failed: {error}", kind="server_error"))
        self.running.clear()
        self.engines.clear()

    def _engine(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            model, tokenizer = self.models[name]
            engine = self.engines[name] = Engine(model, tokenizer)
        return engine

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            self._engine(job.model).add(job.prompt, job.plan(), key=job.id)
        except ConfigError as e:
            job.send(ApiError(400, str(e), param="strategy_params"))
            return
        except Exception as e:  # noqa: BLE001 - one request fails, the server lives on
            log.exception("could not start a generation")
            job.send(ApiError(500, f"Generation failed: {e}", kind="server_error"))
            return
        self.running[job.id] = job

    def _drop_cancelled(self) -> None:
        for job in list(self.running.values()):
            if job.cancelled:
                self.engines[job.model].cancel(job.id)
                del self.running[job.id]

    def _step(self, name: str) -> None:
        engine = self.engines[name]
        try:
            events = engine.step()
        except Exception as e:  # noqa: BLE001 - fail this model's requests, keep serving
            log.exception("generation failed")
            del self.engines[name]
            for job in list(self.running.values()):
                if job.model == name:
                    del self.running[job.id]
                    job.send(ApiError(500, f"Generation failed: {e}", kind="server_error"))
            return
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, TokenEvent]]] = {}
        for event in events:
            job = self.running.get(event.row)
            if job is None:
                continue
            event.logprobs = None  # the HTTP side reads plain values only
            outbox.setdefault(job.loop, []).append((job, event))
            if event.finish_reason is not None:
                del self.running[job.id]
        for loop, items in outbox.items():  # one wake-up of the event loop per step
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Job, TokenEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
