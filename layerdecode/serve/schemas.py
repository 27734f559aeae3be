"""Request bodies of the OpenAI-compatible endpoints, and the errors they answer.

Requests are validated here, on the event loop, before anything is queued: a bad body
is a 400 in OpenAI's error shape, never a traceback. Generation options come from
:class:`~layerdecode.GenerationOptions`; the strategy may only be a registered strategy
or a shipped preset name, never a file path.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from layerdecode.config import resolve_strategy
from layerdecode.errors import ConfigError
from layerdecode.options import GenerationOptions
from layerdecode.registry import list_strategies

from ..config import preset_registry  # preset names, without reading every preset file
from ..errors import did_you_mean
from ..prompts import check_template_kwargs

ROLES = ("system", "developer", "user", "assistant", "tool")
# GenerationOptions a request may set under their own names, beside OpenAI's fields.
EXTRA_OPTIONS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "presence_penalty",
    "presence_context_size",
    "frequency_penalty",
    "frequency_context_size",
    "logit_bias",
)
MAX_N = 16  # samples per request
MAX_PROMPTS = 64  # prompts in one completions request

# The sizes a request's fields may have: a body within --max-body-bytes can still hold more
# than any client needs, and each of these costs work (or an echo in an error) per item.
MAX_MESSAGES = 2048
MAX_STOP = 16  # stop strings, each at most MAX_STOP_CHARS
MAX_STOP_CHARS = 256
MAX_TOOLS = 128  # OpenAI's own limit
MAX_NAME_CHARS = 256  # model, strategy, role
MAX_PARAMS_KEYS = 32  # strategy_params, chat_template_kwargs
MAX_PARAMS_CHARS = 4096  # the same, as JSON


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(max_length=MAX_NAME_CHARS)
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)

    def text(self, index: int = 0) -> str:
        """The content's text; a part other than text (an image...) is a 400."""
        if not isinstance(self.content, list):
            return self.content or ""
        texts = []
        for part in self.content:
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a '{kind}' part" if isinstance(kind, str) else "a part without a type"
                raise ApiError(
                    400,
                    f"messages[{index}].content has {what}: this server reads text parts "
                    '({"type": "text", "text": ...}) only.',
                    param="messages",
                )
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields both endpoints take. Unknown OpenAI fields are ignored, as front-ends send many."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    strategy: str | None = Field(None, max_length=MAX_NAME_CHARS)
    strategy_params: dict[str, Any] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_context_size: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_context_size: int | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=300)  # OpenAI's own bound
    response_format: dict[str, Any] | None = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP:
            raise ValueError(f"give at most {MAX_STOP} stop strings, not {len(strings)}")
        if any(len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("strategy_params")
    @classmethod
    def _bounded_params(cls, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return _bounded_object(params)

    def asked_tokens(self) -> int | None:
        """The token budget the request itself set (``None``: it set none)."""
        return getattr(self, "max_completion_tokens", None) or self.max_tokens


def _bounded_object(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if len(value) > MAX_PARAMS_KEYS:
        raise ValueError(f"give at most {MAX_PARAMS_KEYS} keys, not {len(value)}")
    if len(json.dumps(value)) > MAX_PARAMS_CHARS:
        raise ValueError(f"at most {MAX_PARAMS_CHARS} characters of JSON are accepted")
    return value


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _bounded_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        return _bounded_object(kwargs)

    def template_kwargs(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The chat template's arguments: the request's over the server's ``defaults``."""
        try:
            return check_template_kwargs({**defaults, **(self.chat_template_kwargs or {})})
        except ConfigError as e:
            raise ApiError(400, str(e), param="chat_template_kwargs") from None

    def wanted_logprobs(self) -> int | None:
        """How many alternatives per token to return (``None``: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(CommonRequest):
    # Text, texts, token ids, or lists of token ids (as lm-eval's local-completions sends).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_flag(cls, value: Any) -> Any:
        # Some clients send a boolean: false is no logprobs, true the chosen tokens' only.
        if isinstance(value, bool):
            return 0 if value else None
        return value

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


def parse(model: type[BaseModel], data: Any) -> Any:
    """``data`` validated as ``model``, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required field '{loc}'.", param=param) from None
        message = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"Invalid field '{loc}': {message}.", param=param) from None


def check_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Chat messages as plain dicts; an unknown role is a 400. Tool results and assistant
    messages with tool calls are checked and shaped as chat templates read them."""
    from ..toolcalls import check_tool_message, is_tool_message

    out = []
    for i, message in enumerate(messages):
        raw = message.model_dump(exclude_none=True)
        if is_tool_message(raw):
            try:
                out.append(check_tool_message(i, raw))
            except ConfigError as e:
                raise ApiError(400, str(e), param="messages") from None
            continue
        if message.role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role '{message.role}' is not supported: use one of "
                f"{', '.join(ROLES)}.",
                param="messages",
            )
        if message.content is None:
            raise ApiError(400, f"messages[{i}] has no content.", param="messages")
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": message.text(i)})
    return out


def resolve_request_strategy(name: str | None, params: dict[str, Any] | None, default: str):
    """The request's strategy: a registered strategy or a shipped preset, by name only."""
    name = name or default
    known = sorted(set(list_strategies()) | set(preset_registry().names()))
    if name not in known:
        raise ApiError(
            400,
            f"Unknown strategy '{name}'.{did_you_mean(name, known)} Known: {', '.join(known)}."
            " (Only registered strategy and shipped preset names are accepted, not files.)",
            param="strategy",
        )
    try:
        return resolve_strategy(name, params or None)
    except ConfigError as e:
        raise ApiError(400, str(e), param="strategy_params") from None


def request_options(request: CommonRequest, resolved: Any, max_tokens_limit: int):
    """The request's GenerationOptions over the strategy preset's, with the budget checked."""
    budget = getattr(request, "max_completion_tokens", None) or request.max_tokens
    param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else None
    param = param or "max_tokens"
    if budget is not None and budget <= 0:
        raise ApiError(400, f"{param} must be a positive integer, got {budget}.", param=param)
    if budget is not None and budget > max_tokens_limit:
        raise ApiError(
            400,
            f"{param}={budget} exceeds this server's limit of {max_tokens_limit} tokens.",
            param=param,
        )
    values = {
        "temp": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "max_tokens": budget,
        "stop": request.stop,
        **{name: getattr(request, name) for name in EXTRA_OPTIONS},
    }
    # As mlx_lm.server reads them: 0 turns these off.
    for name in ("top_p", "repetition_penalty"):
        if values[name] == 0:
            values[name] = None
    try:
        options = GenerationOptions.build(values).over(resolved.generation)
    except ConfigError as e:
        named = re.search(r"option (\w+)=", str(e))
        field = named and {"temp": "temperature"}.get(named[1], named[1])
        raise ApiError(400, str(e), param=field or None) from None
    limit = options.max_tokens_or_default()
    if limit == -1 or limit > max_tokens_limit:
        options = GenerationOptions.build(options, max_tokens=max_tokens_limit)
    return options


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A completions request's prompts: texts, or token ids (a list of ints, or of lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    prompts = list(prompt)
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(
            400, f"Give at most {MAX_PROMPTS} prompts, not {len(prompts)}.", param="prompt"
        )
    if any(not p for p in prompts):
        raise ApiError(400, "A prompt is empty: give some text or token ids.", param="prompt")
    return prompts


def check_logit_bias(options: GenerationOptions, tokenizer: Any) -> None:
    """Every token a request's ``logit_bias`` names is in the vocabulary."""
    vocab = len(getattr(tokenizer, "_tokenizer", tokenizer))
    outside = sorted(t for t in options.logit_bias or {} if t >= vocab)
    if outside:
        raise ApiError(
            400,
            f"logit_bias names token {outside[0]}, outside this model's vocabulary "
            f"(0..{vocab - 1}).",
            param="logit_bias",
        )


def check_token_ids(tokens: Any, tokenizer: Any, param: str) -> list[int]:
    """Token ids a request gave, each in the tokenizer's vocabulary."""
    vocab = len(getattr(tokenizer, "_tokenizer", tokenizer))
    if not isinstance(tokens, list) or not tokens:
        raise ApiError(400, f"Give '{param}' as a non-empty list of token ids.", param=param)
    for token in tokens:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
            raise ApiError(
                400,
                f"Token id {token!r} in '{param}' is not in this model's vocabulary "
                f"(0..{vocab - 1}).",
                param=param,
            )
    return tokens


def merge_bodies(bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The answers to a request's prompts as one: choice ``i * n + j`` is prompt ``i``'s
    sample ``j``, and the usage adds up."""
    if len(bodies) == 1:
        return bodies[0]
    merged = dict(bodies[0])
    merged["choices"] = [
        {**choice, "index": i * n + choice["index"]}
        for i, body in enumerate(bodies)
        for choice in body["choices"]
    ]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    cached = 0
    for body in bodies:
        for key in usage:
            usage[key] += body["usage"][key]
        cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
    merged["usage"] = {**usage, "prompt_tokens_details": {"cached_tokens": cached}}
    return merged
