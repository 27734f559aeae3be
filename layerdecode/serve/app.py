"""The HTTP face: OpenAI-compatible endpoints over the generation thread.

Handlers parse and validate on the event loop, queue a :class:`~.worker.Job` and stream
what the generation thread sends back. Every failure is answered in OpenAI's error shape.
What can be known before any work starts is checked first (the body's nesting, the fields'
sizes, the prompt's length against the model's context); prompts are tokenised off the event
loop. :func:`drain` ends a server's work within a bound.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from layerdecode.errors import ConfigError
from layerdecode.prompts import build_prompt
from layerdecode.registry import list_strategies

from ..config import preset_registry  # preset names, without reading every preset file
from ..engine import TokenEvent
from ..layerstats import layer_stats
from .limits import fit_prompt, parse_json
from .schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_messages,
    parse,
    request_options,
    resolve_request_strategy,
)
from .worker import Job, Worker

log = logging.getLogger("layerdecode.serve")


@dataclass
class ServerConfig:
    """What ``layerdecode serve`` was started with."""

    aliases: dict[str, str] = field(default_factory=dict)  # another name -> model id
    strategy: str = "final"
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1_000_000
    api_key: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # requests' defaults
    max_prompt_tokens: int | None = None  # None: the model's context is the limit
    drain_timeout: float = 30.0  # seconds the requests in flight may take after a stop
    tokenisers: int = 2  # prompts tokenised at once, off the event loop


class Disconnected(Exception):
    """The client went away before the answer was complete."""


class Handlers:
    def __init__(self, worker: Worker, config: ServerConfig) -> None:
        self.worker = worker
        self.config = config
        self.default_model = next(iter(worker.models))
        self.tokenising = asyncio.Semaphore(config.tokenisers)

    # --- checks -------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
        except ClientDisconnect:
            log.info("a client left while sending its request body (%d bytes read)", len(body))
            raise Disconnected() from None
        return parse_json(bytes(body))

    def model_of(self, name: str | None) -> str:
        """The id of the served model a request names (none: the default one)."""
        if not name:
            return self.default_model
        name = self.config.aliases.get(name, name)
        if name not in self.worker.models:
            served = ", ".join(f"'{m}'" for m in self.worker.models)
            raise ApiError(
                404,
                f"The model '{name}' is not served here: this server serves {served}.",
                param="model",
                code="model_not_found",
            )
        return name

    # --- endpoints ----------------------------------------------------------------
    def check_open(self) -> None:
        if self.worker.draining:
            raise ApiError(503, "The server is shutting down.", kind="server_error")

    async def health(self, request: Request) -> Response:
        """ok (200) or draining (503), with the jobs running and waiting and the oldest's age."""
        status = "draining" if self.worker.draining else "ok"
        body = {"status": status, "model": self.default_model, **self.worker.stats()}
        return JSONResponse(body, status_code=503 if self.worker.draining else 200)

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        created = int(time.time())
        models = [
            {"id": name, "object": "model", "created": created, "owned_by": "layerdecode"}
            for name in self.worker.models
        ]
        return JSONResponse({"object": "list", "data": models})

    async def chat(self, request: Request) -> Response:
        self.check_key(request)
        self.check_open()
        req = parse(ChatRequest, await self.read_json(request))
        messages = check_messages(req.messages)
        template = req.template_kwargs(self.config.chat_template_kwargs)
        return await self.complete(request, req, messages, chat=True, template=template)

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        self.check_open()
        req = parse(CompletionRequest, await self.read_json(request))
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "Give one prompt: a list of prompts is not supported.")
            prompt = prompt[0]
        return await self.complete(request, req, prompt, chat=False)

    async def playground(self, request: Request) -> Response:
        """The playground page (static; its requests carry the API key when one is set)."""
        page = resources.files(__package__).joinpath("static/playground.html")
        names = sorted(set(list_strategies()) | set(preset_registry().names()))
        config = {
            "model": self.default_model,
            "strategies": names,
            "defaults": [self.config.strategy, "confident"],
        }
        embedded = json.dumps(config).replace("</", "<\\/")
        html = page.read_text(encoding="utf-8").replace("__CONFIG__", embedded)
        return HTMLResponse(html, headers={"Content-Security-Policy": _PAGE_POLICY})

    # --- generation ---------------------------------------------------------------
    async def complete(
        self, request: Request, req: Any, prompt: Any, *, chat: bool, template: Any = None
    ) -> Response:
        model = self.model_of(req.model)
        tokenizer = self.worker.models[model][1]
        resolved = resolve_request_strategy(req.strategy, req.strategy_params, self.config.strategy)
        options = request_options(req, resolved, self.config.max_tokens_limit)
        param = "messages" if chat else "prompt"
        try:
            async with self.tokenising:  # a long prompt takes a while: not on the event loop
                ids = await asyncio.to_thread(
                    build_prompt, tokenizer, prompt, chat=chat, chat_template_kwargs=template
                )
        except ConfigError as e:
            raise ApiError(400, str(e), param=param) from None
        options = fit_prompt(
            len(ids),
            options,
            asked=req.asked_tokens(),
            context=self.worker.contexts[model],
            max_prompt_tokens=self.config.max_prompt_tokens,
            param=param,
        )
        loop = asyncio.get_running_loop()
        job = Job(ids, model, resolved, options, req.wanted_logprobs(), loop)
        self.worker.submit(job)
        answer = Answer(self, job, req, chat=chat)
        try:
            first = await self.next_events(request, job)
        except BaseException:
            self.worker.cancel(job)
            raise
        if req.stream:
            return StreamingResponse(
                answer.stream(request, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        events = first
        checked = time.monotonic()
        try:
            while not events[-1].finish_reason:
                events += await self.next_events(request, job)
                if time.monotonic() - checked > 0.5:  # nothing is sent: ask whether it left
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise Disconnected()
        finally:
            if not (events and events[-1].finish_reason):
                self.worker.cancel(job)
        return JSONResponse(answer.whole(events))

    async def next_events(self, request: Request, job: Job) -> list[TokenEvent]:
        """The events the generation thread has sent (at least one), or its error.

        While nothing comes, asks about once a second whether the client left, and ends the
        job if it has waited in the queue past ``--queue-timeout``.
        """
        while True:
            left = self.worker.queue_left(job)
            try:
                first = await asyncio.wait_for(job.events.get(), min(1.0, left or 1.0))
                break
            except asyncio.TimeoutError:
                if self.worker.expire(job):
                    raise self.queue_timeout(job) from None
                if await request.is_disconnected():
                    raise Disconnected() from None
        events: list[TokenEvent] = []
        for item in [first, *_pending(job.events)]:
            if isinstance(item, ApiError):
                raise item
            events.append(item)
            if item.finish_reason is not None:  # anything after the last token is moot
                break
        return events

    def queue_timeout(self, job: Job) -> ApiError:
        limit = self.worker.queue_timeout
        return ApiError(
            503,
            f"The server is busy: this request waited {self.worker.waited(job):.0f} s in the "
            f"queue (--queue-timeout {limit:g}) without starting. Retry later.",
            kind="server_error",
            code="queue_timeout",
            headers={"Retry-After": str(QUEUE_RETRY_AFTER)},
        )


QUEUE_RETRY_AFTER = 5  # seconds a client is asked to wait after a queue timeout


def _pending(queue: asyncio.Queue) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def drain(worker: Worker, timeout: float) -> int:
    """Take no new request (503) and let those in flight finish for at most ``timeout``
    seconds; end the rest with a 503 (a stream: a final error chunk). Returns how many were
    ended unfinished."""
    worker.drain()
    deadline = time.monotonic() + timeout
    while not worker.idle() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ended = worker.abandon(
        f"The server is shutting down: this request was ended after the {timeout:g} s drain."
    )
    await asyncio.sleep(0.2 if ended else 0)  # their answers reach the clients first
    return ended


# The page loads nothing from elsewhere: its own inline script and style, fetches to itself.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:"
)


def _now() -> int:
    return int(time.time())


class Answer:
    """One request's answer, whole or as server-sent events, in OpenAI's shapes."""

    def __init__(self, handlers: Handlers, job: Job, req: Any, *, chat: bool) -> None:
        self.h = handlers
        self.job = job
        self.req = req
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"
        self.created = _now()
        self.tokenizer = handlers.worker.models[job.model][1]
        self.count = 0
        self.layers: list[int] = []
        self.num_layers = 0

    def kept(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """The events of output tokens (an end-of-sequence token is not output)."""
        return [e for e in events if e.in_output]

    def extension(
        self, events: list[TokenEvent], *, summary: bool, pieces: bool = False
    ) -> dict[str, Any]:
        kept = self.kept(events)
        out: dict[str, Any] = {
            "layers": [e.layer for e in kept],
            "entropies": [round(e.entropy, 4) for e in kept],
            "parts": [e.part for e in kept],
        }
        if pieces:  # the text each token released, to colour it (streams only)
            out["pieces"] = [e.reasoning + e.text for e in kept]
            out["num_layers"] = events[-1].num_layers
        if summary:
            resolved = self.job.resolved
            share = layer_stats(self.layers, self.num_layers - 1)[0] or 0.0
            out = {
                "strategy": resolved.label,
                "params": resolved.strategy.resolved_params(),
                "num_layers": self.num_layers,
                **out,
                "non_final_share": round(share, 4),
            }
        return out

    def logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        if self.job.logprobs is None:
            return None
        decode = self.tokenizer.decode
        kept = self.kept(events)
        if self.chat:
            content = []
            for e in kept:
                text = decode([e.token])
                content.append(
                    {
                        "token": text,
                        "logprob": e.logprob,
                        "bytes": list(text.encode()),
                        "top_logprobs": [
                            {"token": (t := decode([i])), "logprob": lp, "bytes": list(t.encode())}
                            for i, lp in e.top_logprobs or []
                        ],
                    }
                )
            return {"content": content}
        return {
            "tokens": [decode([e.token]) for e in kept],
            "token_logprobs": [e.logprob for e in kept],
            "top_logprobs": [{decode([i]): lp for i, lp in e.top_logprobs or []} for e in kept],
        }

    def track(self, events: list[TokenEvent]) -> None:
        kept = self.kept(events)
        self.count += len(kept)
        self.layers += [e.layer for e in kept]
        self.num_layers = events[-1].num_layers

    def usage(self, events: list[TokenEvent]) -> dict[str, int]:
        prompt = events[-1].prompt_tokens if events else len(self.job.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.count,
            "total_tokens": prompt + self.count,
        }

    def whole(self, events: list[TokenEvent]) -> dict[str, Any]:
        self.track(events)
        choice: dict[str, Any] = {"index": 0, "finish_reason": events[-1].finish_reason}
        choice.update(self.output(events, key="message", role=True))
        choice["logprobs"] = self.logprobs(events)
        choice["layerdecode"] = self.extension(events, summary=True)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": [choice],
            "usage": self.usage(events),
        }

    def output(self, events: list[TokenEvent], *, key: str, role: bool) -> dict[str, Any]:
        """The answer text of ``events`` and their reasoning, if any, in the choice's shape:
        under ``key`` (message, delta) for chat, as ``text`` and ``reasoning`` otherwise."""
        body: dict[str, Any] = {"role": "assistant"} if role and self.chat else {}
        body["content" if self.chat else "text"] = "".join(e.text for e in events)
        reasoning = "".join(e.reasoning for e in events)
        if reasoning:  # as mlx_lm.server: only when there is some
            body["reasoning"] = reasoning
        return {key: body} if self.chat else body

    def chunk(self, events: list[TokenEvent], *, first: bool) -> dict[str, Any]:
        self.track(events)
        finish = events[-1].finish_reason
        choice: dict[str, Any] = {"index": 0}
        choice.update(self.output(events, key="delta", role=first))
        choice["finish_reason"] = finish
        choice["logprobs"] = self.logprobs(events)
        choice["layerdecode"] = self.extension(events, summary=finish is not None, pieces=True)
        return self.envelope([choice])

    def envelope(self, choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
            **more,
        }

    async def stream(self, request: Request, first: list[TokenEvent]) -> AsyncIterator[str]:
        events = first
        finished = False
        try:
            yield _sse(self.chunk(events, first=True))
            while not events[-1].finish_reason:
                events = await self.h.next_events(request, self.job)
                yield _sse(self.chunk(events, first=False))
            finished = True
            if self.req.include_usage():
                yield _sse(self.envelope([], usage=self.usage(events)))
        except ApiError as e:
            finished = True
            yield _sse(e.body())
        except Disconnected:
            return
        finally:
            if not finished:
                self.h.worker.cancel(self.job)
        yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "Not found: see /v1/models, /v1/chat/completions, /v1/completions."}
    return _error_response(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail))))


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    return _error_response(
        ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", kind="server_error")
    )


def create_app(worker: Worker, config: ServerConfig) -> Starlette:
    """The ASGI app; the worker's thread is started and stopped with the app's lifespan."""
    from contextlib import asynccontextmanager

    h = Handlers(worker, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop, config.drain_timeout)

    routes = [
        Route("/", h.playground, methods=["GET"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
    ]
    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        Disconnected: _disconnected,
        ClientDisconnect: _disconnected,
        Exception: _unexpected,
    }
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
