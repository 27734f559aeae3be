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
from ..structured import response_format_processor
from ..toolcalls import check_tool_choice, check_tools, tool_choice_processor
from .answer import Answer
from .limits import fit_prompt, parse_json
from .schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_logit_bias,
    check_messages,
    check_token_ids,
    completion_prompts,
    merge_bodies,
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
    allowed_origins: tuple[str, ...] = ()  # CORS: origins allowed to call from a browser


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
        try:
            tools = check_tools(req.tools)
            choice = check_tool_choice(req.tool_choice, tools)
        except ConfigError as e:
            raise ApiError(400, str(e), param="tools") from None
        return await self.complete(
            request, req, [messages], chat=True, template=template, tools=tools, choice=choice
        )

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        self.check_open()
        req = parse(CompletionRequest, await self.read_json(request))
        prompts = completion_prompts(req.prompt)
        if req.stream and len(prompts) > 1:
            raise ApiError(400, "Stream one prompt at a time (or send the list unstreamed).",
                           param="prompt")  # fmt: skip
        return await self.complete(request, req, prompts, chat=False)

    async def tokenizer_info(self, request: Request) -> Response:
        """The default model's tokenizer, as vLLM describes it (lm-eval's remote tokenizer)."""
        self.check_key(request)
        tokenizer = self.worker.models[self.default_model][1]
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        return JSONResponse(
            {
                "eos_token": hf.eos_token,
                "bos_token": hf.bos_token,
                "pad_token": hf.pad_token,
                "chat_template": getattr(hf, "chat_template", None),
                "model": self.default_model,
            }
        )

    async def tokenize(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "Give the text to tokenize as 'prompt'.", param="prompt")
        model = self.model_of(body.get("model"))
        hf = getattr(self.worker.models[model][1], "_tokenizer", None)
        special = bool(body.get("add_special_tokens", True))
        ids = await asyncio.to_thread(hf.encode, text, add_special_tokens=special)
        return JSONResponse({"tokens": ids, "count": len(ids)})

    async def detokenize(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        model = self.model_of(body.get("model") if isinstance(body, dict) else None)
        tokenizer = self.worker.models[model][1]
        check_token_ids(tokens, tokenizer, "tokens")
        return JSONResponse({"prompt": tokenizer.decode(tokens)})

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
        self,
        request: Request,
        req: Any,
        prompts: list[Any],
        *,
        chat: bool,
        template: Any = None,
        tools: Any = None,
        choice: Any = None,
    ) -> Response:
        model = self.model_of(req.model)
        tokenizer = self.worker.models[model][1]
        resolved = resolve_request_strategy(req.strategy, req.strategy_params, self.config.strategy)
        options = request_options(req, resolved, self.config.max_tokens_limit)
        check_logit_bias(options, tokenizer)
        param = "messages" if chat else "prompt"
        loop = asyncio.get_running_loop()
        jobs = []
        for prompt in prompts:
            ids = await self.prompt_ids(tokenizer, prompt, chat, template, tools, choice, param)
            fitted = fit_prompt(
                len(ids),
                options,
                asked=req.asked_tokens(),
                context=self.worker.contexts[model],
                max_prompt_tokens=self.config.max_prompt_tokens,
                param=param,
            )
            processors = await self.processors(req, tokenizer, tools, choice)
            echo = getattr(req, "echo", False)
            jobs.append(
                Job(ids, model, resolved, fitted, req.wanted_logprobs(), loop, n=req.n,
                    processors=processors, echo=(req.logprobs or 0) if echo else None)
            )  # fmt: skip
        answers = [Answer(job, tokenizer, chat=chat, tools=tools) for job in jobs]
        try:
            for job in jobs:  # a full queue refuses the rest: none is left running unread
                self.worker.submit(job)
            if req.stream:
                first = await self.next_events(request, jobs[0])
        except BaseException:
            for job in jobs:
                self.worker.cancel(job)
            raise
        if req.stream:
            return StreamingResponse(
                self.stream(request, answers[0], req, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        bodies = []
        try:
            for job, answer in zip(jobs, answers, strict=True):
                bodies.append(answer.whole(await self.collect(request, job)))
        finally:
            for job in jobs:
                if not job.finished:
                    self.worker.cancel(job)
        return JSONResponse(merge_bodies(bodies, req.n))

    async def prompt_ids(self, tokenizer, prompt, chat, template, tools, choice, param):
        """A prompt's token ids: given as ids (checked), or built (off the event loop)."""
        if isinstance(prompt, list) and not chat:
            return check_token_ids(prompt, tokenizer, param)
        kwargs: dict[str, Any] = {"chat": chat, "chat_template_kwargs": template}
        if tools is not None and choice is not None:
            kwargs["tools"] = choice.template_tools(tools)
        try:
            async with self.tokenising:  # a long prompt takes a while: not on the event loop
                return await asyncio.to_thread(build_prompt, tokenizer, prompt, **kwargs)
        except ConfigError as e:
            raise ApiError(400, str(e), param=param) from None

    async def processors(self, req, tokenizer, tools, choice) -> list[tuple[Any, ...]]:
        """Each sample's grammar processors: its response_format, or the calls its
        tool_choice requires (one fresh processor per sample: they follow their row)."""
        fmt = getattr(req, "response_format", None)
        if fmt is None and (tools is None or choice is None or choice.mode != "required"):
            return []

        def make() -> list[tuple[Any, ...]]:
            out = []
            for _ in range(req.n):
                if fmt is not None:
                    made = response_format_processor(tokenizer, fmt)
                else:
                    made = tool_choice_processor(tokenizer, tools, choice)
                out.append(() if made is None else (made,))
            return out

        try:
            return await asyncio.to_thread(make)
        except ConfigError as e:
            field = "response_format" if fmt is not None else "tool_choice"
            raise ApiError(400, str(e), param=field) from None

    async def collect(self, request: Request, job: Job) -> list[Any]:
        """Everything the job sends until its samples have all ended."""
        items: list[Any] = []
        checked = time.monotonic()
        while not job.finished:
            items += await self.next_events(request, job)
            if time.monotonic() - checked > 0.5:  # nothing is sent: ask whether it left
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise Disconnected()
        return items

    async def stream(
        self, request: Request, answer: Answer, req: Any, first: list[Any]
    ) -> AsyncIterator[str]:
        job, items = answer.job, first
        finished = False
        try:
            yield _sse(answer.chunk(items, first=True))
            while not job.finished:
                items = await self.next_events(request, job)
                yield _sse(answer.chunk(items, first=False))
            finished = True
            if req.include_usage():
                yield _sse(answer.envelope([], usage=answer.usage()))
        except ApiError as e:
            finished = True
            yield _sse(e.body())
        except Disconnected:
            return
        finally:
            if not finished:
                self.worker.cancel(job)
        yield "data: [DONE]\n\n"

    async def next_events(self, request: Request, job: Job) -> list[Any]:
        """What the generation thread has sent (at least one item), or its error.

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
        items: list[Any] = []
        for item in [first, *_pending(job.events)]:
            if isinstance(item, ApiError):
                raise item
            items.append(item)
            if isinstance(item, TokenEvent) and item.finish_reason is not None:
                job.ended += 1
                if job.finished:  # anything after the last token is moot
                    break
        return items

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
        Route("/tokenizer_info", h.tokenizer_info, methods=["GET"]),
        Route("/tokenize", h.tokenize, methods=["POST"]),
        Route("/detokenize", h.detokenize, methods=["POST"]),
    ]
    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        Disconnected: _disconnected,
        ClientDisconnect: _disconnected,
        Exception: _unexpected,
    }
    middleware = []
    if config.allowed_origins:  # CORS for browser front-ends, none unless asked for
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.allowed_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
            )
        )
    return Starlette(
        routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware
    )
