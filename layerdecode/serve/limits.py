"""Limits known before any work starts: a body's nesting, a model's context, a prompt's length.

Each check answers a 400 in OpenAI's error shape that names the limit, so that a hostile or
mistaken request costs the server a scan of its bytes, never a prefill.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ..options import GenerationOptions
from .schemas import ApiError

MAX_JSON_DEPTH = 64

# The names mlx-lm architectures give their context length, most common first.
_CONTEXT_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "context_length",
    "block_size",
)
# A string runs to its closing quote or, unclosed, to the end: every match succeeds, so the
# scan is linear whatever the body (a failed match retried at each later quote would not be).
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|\Z)', re.DOTALL)


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``body`` parsed as JSON, or a 400: not UTF-8, not JSON, or nested too deeply.

    The nesting is measured before parsing, over the brackets outside strings, so that no
    parser recursion ever sees a hostile depth.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid JSON in UTF-8.") from None
    depth = json_depth(body)
    if depth > max_depth:
        raise ApiError(
            400,
            f"The request body is nested too deeply ({depth:,} levels; the limit is {max_depth}).",
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.") from None


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (UTF-8 JSON), without recursion."""
    if body.count(b"[") + body.count(b"{") == 0:
        return 0
    outside = np.frombuffer(_STRING.sub(b'""', body), dtype=np.uint8)
    step = np.isin(outside, (ord("["), ord("{"))).astype(np.int32)
    step -= np.isin(outside, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def context_length(model: Any) -> int | None:
    """The model's context in tokens, from its mlx-lm arguments; ``None`` if it names none."""
    configs: list[Any] = []
    for owner in (model, getattr(model, "language_model", None), getattr(model, "model", None)):
        args = getattr(owner, "args", None)
        if args is not None:
            configs += [args, _field(args, "text_config")]
    for config in configs:
        for name in _CONTEXT_FIELDS:
            value = _field(config, name)
            # Some configs carry a sentinel (1e30) for "no limit": that is no answer.
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31:
                return value
    return None


def _field(config: Any, name: str) -> Any:
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def fit_prompt(
    prompt_tokens: int,
    options: GenerationOptions,
    *,
    asked: int | None,
    context: int | None,
    max_prompt_tokens: int | None,
    param: str,
) -> GenerationOptions:
    """Check a prompt of ``prompt_tokens`` against the server's and the model's limits.

    ``asked`` is the budget the request itself set (``None``: it set none, and the budget
    shrinks to what the context leaves). Returns the options with that budget.
    """
    limit, why = _prompt_limit(context, max_prompt_tokens)
    if limit is not None and prompt_tokens > limit:
        raise ApiError(
            400,
            f"The prompt has {prompt_tokens:,} tokens; {why}. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if context is None:
        return options
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"The prompt has {prompt_tokens:,} tokens; this model's context is {context:,} "
            "tokens, which leaves no room for an answer. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if asked is not None and asked > room:
        raise ApiError(
            400,
            f"The prompt has {prompt_tokens:,} tokens and max_tokens asks for {asked:,} more: "
            f"{prompt_tokens + asked:,} in all, over this model's context of {context:,} "
            f"tokens. Ask for at most {room:,} tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    budget = options.max_tokens_or_default()
    if budget == -1 or budget > room:
        options = GenerationOptions.build(options, max_tokens=room)
    return options


def _prompt_limit(context: int | None, flag: int | None) -> tuple[int | None, str]:
    """The longest prompt this server takes, and how to say where that limit comes from."""
    if flag is not None and (context is None or flag < context):
        of_model = "" if context is None else f"; the model's context is {context:,} tokens"
        return flag, (
            f"this server takes prompts of at most {flag:,} tokens "
            f"(--max-prompt-tokens {flag}{of_model})"
        )
    if context is not None:
        return context, f"this model's context is {context:,} tokens"
    return None, ""
