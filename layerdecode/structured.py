"""Structured output: answers that are JSON, or JSON that follows a schema.

A request's ``response_format`` takes OpenAI's shapes: ``{"type": "text"}`` (no constraint),
``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}, "strict": ...}}``. :func:`check_response_format` checks one
and compiles its grammar; :func:`response_format_processor` makes the logits processor of
one row: it follows the row's tokens through the grammar (llguidance's matcher) and sets
every token the grammar does not allow next to ``-inf``, on the distribution the row's
strategy decoded from. Each row has its own processor, so constrained rows share the
batch with free ones. The end-of-sequence token is allowed exactly when the grammar accepts.

The grammar engine is llguidance (the ``structured`` extra): it works from the Hugging Face
tokenizer mlx-lm loads, with no torch, and computes a mask in tens of microseconds.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, did_you_mean

INSTALL_HINT = "pip install 'layerdecode[structured]'"
RESPONSE_TYPES = ("text", "json_object", "json_schema")
JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# JSON written as json.dumps writes it, on one line: small models that may add whitespace
# can add it forever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConfigError(
            "Structured output (response_format, tool_choice 'required') needs llguidance: "
            f"{INSTALL_HINT}."
        ) from None
    return llguidance


@dataclass(frozen=True)
class ResponseFormat:
    """A checked ``response_format``: its JSON Schema and the grammar compiled from it.

    Attributes:
        type: ``"json_object"`` or ``"json_schema"``.
        schema: the JSON Schema the answer follows (``{"type": "object"}`` for a JSON object).
        name: the schema's name (``json_schema`` only).
        strict: the request's ``strict``; ``False`` lets the schema use keywords the grammar
            does not implement (they are ignored), otherwise they are an error.
        grammar: llguidance's grammar, ready for a matcher.
    """

    type: str
    schema: dict[str, Any]
    name: str | None
    strict: bool | None
    grammar: str


def check_response_format(value: Any) -> ResponseFormat | None:
    """A request's ``response_format`` checked and compiled; ``None`` for plain text.

    Raises:
        ConfigError: one line naming what is wrong: not an object, an unknown type or key,
            a missing name or schema, a schema that is not a JSON Schema object, a keyword
            the grammar does not support, or a schema no value can satisfy; or llguidance
            is not installed.
    """
    if value is None:
        return None
    if isinstance(value, ResponseFormat):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            'response_format must be an object such as {"type": "json_object"}, '
            f"got {type(value).__name__}."
        )
    kind = value.get("type")
    if kind not in RESPONSE_TYPES:
        hint = did_you_mean(kind, RESPONSE_TYPES) if isinstance(kind, str) else ""
        raise ConfigError(
            f"response_format.type {kind!r} is not supported.{hint} "
            f"Use one of: {', '.join(RESPONSE_TYPES)}."
        )
    _no_unknown_keys(value, ("type", "json_schema"), "response_format")
    if kind != "json_schema" and "json_schema" in value:
        raise ConfigError(
            f'response_format.json_schema is only read with "type": "json_schema", not {kind!r}.'
        )
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        return ResponseFormat(kind, schema, None, None, _compile(schema, strict=None))
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ConfigError(
            'response_format.json_schema must be an object: {"name": ..., "schema": {...}}.'
        )
    _no_unknown_keys(spec, JSON_SCHEMA_KEYS, "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', "
            f"got {name!r}."
        )
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        got = "nothing" if schema is None else type(schema).__name__
        raise ConfigError(
            "response_format.json_schema.schema must be a JSON Schema object, e.g. "
            f'{{"type": "object", "properties": {{...}}}}, got {got}.'
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ConfigError(
            f"response_format.json_schema.strict must be true or false, got {strict!r}."
        )
    if "description" in spec and not isinstance(spec["description"], str):
        raise ConfigError("response_format.json_schema.description must be a string.")
    schema = dict(schema)
    return ResponseFormat(kind, schema, name, strict, _compile(schema, strict=strict))


def _no_unknown_keys(value: Mapping, known: Iterable[str], where: str) -> None:
    known = tuple(known)
    unknown = [k for k in value if k not in known]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(
            f"{where} has an unknown key {key!r}.{did_you_mean(key, known)} "
            f"Known: {', '.join(known)}."
        )


def _compile(schema: dict[str, Any], *, strict: bool | None) -> str:
    """llguidance's grammar for ``schema``, checked; errors become one ``ConfigError`` line."""
    llg = _llguidance()
    options = {**JSON_LAYOUT, "lenient": strict is False}
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"response_format schema is not valid JSON: {_one_line(e)}.") from None
    check_grammar(grammar, "response_format schema")
    return grammar


def check_grammar(grammar: str, what: str) -> None:
    """A ``ConfigError`` naming ``what`` if llguidance cannot compile ``grammar``."""
    llg = _llguidance()
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        message = _one_line(messages[0] if messages else "rejected")
        hint = ""
        if message.startswith("Unimplemented keys"):
            hint = ' (with "strict": false they are ignored)'
        raise ConfigError(f"{what} is not supported: {message}{hint}.")


def _one_line(message: Any) -> str:
    return " ".join(str(message).split()).rstrip(".")


# -- the per-row processor -------------------------------------------------------------------

_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer for an mlx-lm ``TokenizerWrapper`` (built once, ~0.5 s).

    Built from the Hugging Face tokenizer the wrapper holds, with the wrapper's
    end-of-sequence tokens.
    """
    _llguidance()
    with _tokenizers_lock:
        found = _tokenizers.get(tokenizer)
        if found is not None:
            return found
        from llguidance.hf import from_tokenizer

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        try:
            found = from_tokenizer(hf, eos_token=eos)
        except ValueError as e:  # a slow (Python) tokenizer
            raise ConfigError(
                f"Structured output needs a fast Hugging Face tokenizer: {_one_line(e)}."
            ) from None
        _tokenizers[tokenizer] = found
        return found


_START, _REASONING, _ANSWER = "start", "reasoning", "answer"


class GrammarProcessor:
    """One row's grammar as an engine logits processor: ``(history, logits) -> logits``.

    The first call sees the prompt and consumes nothing; each later call first feeds the
    matcher the tokens added to ``history`` since, then keeps only the tokens the grammar
    allows. The mask is as wide as ``logits``: ids past the tokenizer's vocabulary (a padded
    embedding) are never allowed. A token the grammar refused (it cannot be sampled after
    this mask) leaves only the end of sequence, so the row ends; :attr:`error` says why.

    A thinking model (one-token ``<think>`` markers, as mlx-lm finds them) reasons freely
    first: when the prompt leaves the output inside a think block, or when the model opens
    one as its first token; the grammar holds from the end of the block on.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        llg = _llguidance()
        self.llg_tokenizer = grammar_tokenizer(tokenizer)
        self.matcher = llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"The grammar is not valid: {_one_line(self.matcher.get_error())}.")
        self.bitmask = np.zeros((1, (self.llg_tokenizer.vocab_size + 31) // 32), dtype=np.int32)
        self.eos = frozenset(self.llg_tokenizer.eos_tokens)
        self.think = _think_ids(tokenizer)  # (start, end) ids, or None
        self.part = _ANSWER if self.think is None else _START
        self.seen: int | None = None  # history length at the last call
        self.error: str | None = None

    def __call__(self, history: Any, logits: Any) -> Any:
        import mlx.core as mx

        size = history.size
        if self.seen is None:
            self.seen = size  # the prompt
            if self.think is not None and _opens_think(history.tolist(), self.think):
                self.part = _REASONING
        elif size > self.seen:
            fresh = history[self.seen :].tolist()
            self.seen = size
            self._consume(fresh)
        elif size < self.seen:
            raise RuntimeError("A GrammarProcessor follows one row: make one per row.")
        if self.part == _REASONING:
            return logits
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        width = logits.shape[-1]
        bits = np.unpackbits(self.bitmask.view(np.uint8), count=width, bitorder="little")
        if self.part == _START and self.think[0] < width:
            bits[self.think[0]] = 1  # the answer may start with a think block
        allowed = mx.array(bits, dtype=mx.bool_)
        masked = mx.where(allowed, logits, -mx.inf)
        # A strategy may have cut every allowed token to -inf (DoLa keeps only tokens near
        # the final layer's best): then the allowed tokens are equally likely. (Zero, not a
        # huge negative number: a repetition penalty after this multiplies it.)
        kept = mx.any(masked > -mx.inf, axis=-1, keepdims=True)
        return mx.where(kept, masked, mx.where(allowed, 0.0, -mx.inf).astype(logits.dtype))

    def _consume(self, tokens: list[int]) -> None:
        for token in tokens:
            if self.part == _START:
                if token == self.think[0]:
                    self.part = _REASONING
                    continue
                self.part = _ANSWER  # the answer's first token
            elif self.part == _REASONING:
                if token == self.think[1]:
                    self.part = _ANSWER
                continue
            if self.matcher.is_stopped() and token in self.eos:
                continue  # the row's end, read again by the step built before it ended
            if not self.matcher.consume_token(token) and self.error is None:
                self.error = _one_line(self.matcher.get_error().split("<state>")[0])

    @property
    def accepting(self) -> bool:
        """Whether the tokens so far are a whole answer of the grammar."""
        return self.matcher.is_accepting()


def _think_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of a one-token ``<think>`` and ``</think>``, if the tokenizer has them."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    start, end = tokenizer.think_start_tokens, tokenizer.think_end_tokens
    if len(start) != 1 or len(end) != 1:
        return None  # markers of several tokens: the grammar holds from the start
    return start[0], end[0]


def _opens_think(prompt: list[int], think: tuple[int, int]) -> bool:
    """Whether the prompt ends inside a think block (its template opened one)."""
    starts = [i for i, t in enumerate(prompt) if t == think[0]]
    ends = [i for i, t in enumerate(prompt) if t == think[1]]
    return bool(starts) and (not ends or starts[-1] > ends[-1])


def response_format_processor(
    tokenizer: Any, response_format: Mapping[str, Any] | ResponseFormat | None
) -> GrammarProcessor | None:
    """A fresh processor for one row that answers in ``response_format`` (``None``: text).

    ``tokenizer`` is the row's mlx-lm ``TokenizerWrapper``; ``response_format`` a request's
    (checked here unless it already was). Give it to the row's ``Plan`` as
    ``logits_processors=(processor,)``.
    """
    checked = check_response_format(response_format)
    if checked is None:
        return None
    return GrammarProcessor(tokenizer, checked.grammar)
