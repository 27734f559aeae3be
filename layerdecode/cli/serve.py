"""``serve``: the OpenAI-compatible HTTP server (see docs/serving.md)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click

from .console import load_model
from .options import CONTEXT_SETTINGS, chat_template_option, model_options


def limit_option(flag: str, default: int, high: int, help: str, *, low: int = 1) -> Any:
    """A bounded integer limit of the server, shown with its default."""
    return click.option(
        flag, default=default, show_default=True, type=click.IntRange(low, high), help=help
    )


@click.command(
    "serve", context_settings=CONTEXT_SETTINGS, short_help="Serve an OpenAI-compatible API."
)
@model_options
@click.option(
    "-s",
    "--strategy",
    default="final",
    show_default=True,
    metavar="NAME|PRESET",
    help="Default strategy of requests that name none: a strategy or a shipped preset name.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on.",
)
@limit_option("--max-batch", 16, 1024, "Requests decoded at once; more wait in the queue.")
@limit_option(
    "--max-queue",
    64,
    100_000,
    "Requests that may wait; beyond that the server answers 429 with Retry-After.",
    low=0,
)
@limit_option(
    "--max-tokens-limit",
    4096,
    1_000_000,
    "The largest max_tokens a request may ask for (also the cap of requests without one).",
)
@limit_option("--max-body-bytes", 1_000_000, 1 << 30, "Larger request bodies are answered 413.")
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(1, None),
    metavar="N",
    help="Longer prompts are answered 400 before any work. Default: the model's context "
    "(from its config; prompt plus max_tokens must fit in it too).",
)
@limit_option(
    "--queue-timeout",
    120,
    86_400,
    "Seconds a request may wait for a batch slot; then 503 with Retry-After (0: no limit).",
    low=0,
)
@limit_option(
    "--drain-timeout",
    30,
    86_400,
    "On SIGINT/SIGTERM, seconds the requests in flight may take before they are ended "
    "(503, or a final error chunk); a second signal exits at once.",
    low=0,
)
@click.option(
    "--prefill-step-size",
    type=click.IntRange(1, 1 << 20),
    metavar="N",
    help="Prompt tokens per forward pass while prefilling; running streams step between "
    "chunks. Default: 2048 on a GPU (as mlx_lm.server), 512 on the CPU, where a chunk of "
    "2048 holds the streams for a minute.",
)
@limit_option(
    "--prompt-cache-size",
    10,
    100_000,
    "Finished requests whose caches are kept, so that a prompt sharing a prefix with one "
    "(the next turn of a chat) prefills only the rest (0: none).",
    low=0,
)
@click.option(
    "--prompt-cache-bytes",
    type=click.IntRange(1, None),
    metavar="BYTES",
    help="Bound the kept caches' total size too (default: only their number).",
)
@click.option(
    "--kv-bits",
    type=click.IntRange(2, 8),
    metavar="BITS",
    help="Quantise the KV caches to this many bits (mlx-lm's quantised cache; 4 or 8). "
    "Such caches cannot be batched: requests then decode one at a time, as in mlx_lm.server.",
)
@limit_option("--kv-group-size", 64, 1024, "Group size of the KV cache quantisation.")
@limit_option(
    "--quantized-kv-start",
    5000,
    1 << 30,
    "Quantise a request's KV cache once it holds this many tokens.",
    low=0,
)
@click.option(
    "--allowed-origins",
    metavar="ORIGINS",
    default="",
    help="Comma-separated origins browser pages may call the API from (CORS), or '*'. "
    "Default: none.",
)
@click.option(
    "--api-key",
    envvar="LAYERDECODE_API_KEY",
    show_envvar=True,
    metavar="KEY",
    help="Require 'Authorization: Bearer KEY' on every endpoint but /health.",
)
@click.option(
    "--allow-model-switch",
    multiple=True,
    metavar="NAME|PATH",
    help="Also serve this model (repeatable): loaded at start, chosen by a request's "
    "'model'. Requests can name no other model.",
)
@chat_template_option
@click.option(
    "--chat-template",
    metavar="TEMPLATE|FILE",
    help="Use this Jinja chat template (or the file holding it) instead of the tokenizer's; "
    "its tool-call markers are read from it, as mlx-lm does.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
    help="uvicorn's log level ('info' logs every request).",
)
def serve_command(**kwargs: Any) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a strategy per request.

    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
    GET /health, and a playground page at /. Requests choose their strategy with the
    extra body fields "strategy" and "strategy_params"; each choice carries the layer of
    every token under "layerdecode". A thinking model's reasoning comes apart from the
    answer, as "reasoning" beside "content"; a chat request's "chat_template_kwargs" go
    over --chat-template-kwargs. SIGINT/SIGTERM stop taking requests and let those in flight
    finish for at most --drain-timeout seconds, then exit 0; a second signal exits at once.
    """
    try:
        import uvicorn

        from layerdecode.serve import ServerConfig, Worker, create_app
    except ImportError as e:
        raise click.ClickException(
            f"The server needs the 'serve' extra ({e.name} is missing): "
            "pip install 'layerdecode[serve]'."
        ) from None
    from layerdecode.errors import ConfigError
    from layerdecode.loading import DEFAULT_MODEL
    from layerdecode.prompts import with_chat_template
    from layerdecode.serve.prompt_cache import PromptCache
    from layerdecode.serve.schemas import ApiError, resolve_request_strategy

    try:  # a bad default fails now, not at the first request
        resolve_request_strategy(kwargs["strategy"], None, "final")
    except ApiError as e:
        raise click.BadParameter(e.message, param_hint="'--strategy'") from None
    host = kwargs["host"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: serving on {host}: anyone who can reach it may use the model"
            + ("" if kwargs["api_key"] else " (no --api-key set)"),
            err=True,
        )
    names = list(dict.fromkeys([kwargs["model"] or DEFAULT_MODEL, *kwargs["allow_model_switch"]]))
    models: dict[str, tuple[Any, Any]] = {}
    aliases: dict[str, str] = {}
    for name in names:  # a path is served under its folder or file name, not the whole path
        model_id = Path(name).name if os.path.exists(name) else name
        if model_id in models:
            model_id = name
        model, tokenizer = load_model(name, kwargs["dtype"])
        if kwargs["chat_template"]:
            try:
                tokenizer = with_chat_template(tokenizer, kwargs["chat_template"])
            except ConfigError as e:
                raise click.BadParameter(str(e), param_hint="'--chat-template'") from None
        models[model_id] = model, tokenizer
        aliases[name] = model_id
    model_id = next(iter(models))
    config = ServerConfig(
        aliases=aliases,
        strategy=kwargs["strategy"],
        max_tokens_limit=kwargs["max_tokens_limit"],
        max_body_bytes=kwargs["max_body_bytes"],
        api_key=kwargs["api_key"] or None,
        chat_template_kwargs=kwargs["chat_template_kwargs"] or {},
        max_prompt_tokens=kwargs["max_prompt_tokens"],
        drain_timeout=kwargs["drain_timeout"],
        allowed_origins=tuple(o.strip() for o in kwargs["allowed_origins"].split(",") if o.strip()),
    )
    engine_options = {}
    if kwargs["kv_bits"] is not None:
        engine_options = {
            "kv_bits": kwargs["kv_bits"],
            "kv_group_size": kwargs["kv_group_size"],
            "quantized_kv_start": kwargs["quantized_kv_start"],
        }
    worker = Worker(
        models,
        max_batch=kwargs["max_batch"],
        max_queue=kwargs["max_queue"],
        queue_timeout=kwargs["queue_timeout"] or None,
        prefill_step_size=kwargs["prefill_step_size"],
        prompt_cache=PromptCache(kwargs["prompt_cache_size"], kwargs["prompt_cache_bytes"]),
        engine_options=engine_options,
    )
    app = create_app(worker, config)
    server = draining_server(uvicorn, worker, kwargs["drain_timeout"])(
        uvicorn.Config(
            app,
            host=host,
            port=kwargs["port"],
            log_level=kwargs["log_level"],
            # The drain has answered every request by the time uvicorn shuts down: this only
            # bounds a connection still sending its body.
            timeout_graceful_shutdown=3,
        )
    )
    click.echo(
        f"layerdecode: serving {model_id} on http://{_url_host(host)}:{kwargs['port']}", err=True
    )
    server.run()
    _leave(0)  # the requests in flight are answered by now


def draining_server(uvicorn: Any, worker: Any, timeout: float) -> Any:
    """uvicorn's Server whose first SIGINT/SIGTERM drains ``worker`` for at most ``timeout``
    seconds before uvicorn shuts down, and whose second exits at once."""
    from layerdecode.serve.app import drain

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None
        draining = False

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.loop is None:  # not serving yet: uvicorn's own handling
                super().handle_exit(sig, frame)
                self._captured_signals.clear()
            elif self.draining:
                click.echo("layerdecode: a second signal: exiting now", err=True)
                _leave(0)
            else:
                self.draining = True
                self.loop.call_soon_threadsafe(self.loop.create_task, self.drain())

        async def drain(self) -> None:
            stats = worker.stats()
            count = stats["running"] + stats["waiting"]
            click.echo(
                f"layerdecode: stopping; {count} requests in flight may take {timeout:g} s more "
                "(a second signal exits now)",
                err=True,
            )
            ended = await drain(worker, timeout)
            if ended:
                click.echo(f"layerdecode: {ended} requests ended unfinished", err=True)
            self.should_exit = True

    return Server


def _leave(code: int) -> None:
    # Not the interpreter's teardown: it can race MLX's native worker threads and abort the
    # process (seen once as SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
