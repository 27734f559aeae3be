"""Tool calls: the request's tools checked, and the calls a model writes taken out of its text.

Models that call tools write each call between markers of their family (``<tool_call>`` and
``</tool_call>`` for Qwen and Hermes, ``[TOOL_CALLS]`` for Mistral...). mlx-lm's
``TokenizerWrapper`` knows a model's markers and its parser (``mlx_lm.tool_parsers``);
:class:`ToolCallSplitter` is fed the answer text as it streams, holds back what may be a
marker, and hands back the plain text and, as each call closes, the call in OpenAI's shape.
A call mlx-lm's parser cannot read (cut by ``max_tokens``, say) comes back as plain text.

The request side: :func:`check_tools` and :func:`check_tool_choice` check OpenAI's
``tools`` and ``tool_choice``; :func:`check_tool_message` turns a ``role: "tool"`` message
or an assistant message with ``tool_calls`` into what chat templates read.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ConfigError, did_you_mean

log = logging.getLogger("layerdecode.toolcalls")

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")
_TOOL, _TEXT = "tool", "normal"


# -- calls out of the generated text ---------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is the arguments object as JSON text."""

    index: int
    id: str
    name: str
    arguments: str

    def message(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def delta(self) -> dict[str, Any]:
        """The call as a streamed ``delta.tool_calls`` entry (whole, with its ``index``)."""
        return {"index": self.index, **self.message()}


class ToolPiece(NamedTuple):
    """What some output released: plain text and the calls that closed in it."""

    text: str
    calls: list[ToolCall]


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes calls: the markers and mlx-lm's parser for the text
    between them (``parse(text, tools)`` gives a call ``{"name", "arguments"}`` or a list)."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]

    @classmethod
    def of(cls, tokenizer: Any) -> ToolFormat | None:
        """The format an mlx-lm ``TokenizerWrapper`` knows, ``None`` if it knows none."""
        if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
            return None
        return cls(tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)

    @classmethod
    def named(cls, name: str) -> ToolFormat:
        """The format of one of mlx-lm's parsers by module name (``"json_tools"``...)."""
        try:
            module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
        except ModuleNotFoundError:
            import pkgutil

            from mlx_lm import tool_parsers

            known = sorted(m.name for m in pkgutil.iter_modules(tool_parsers.__path__))
            raise ConfigError(
                f"Unknown tool parser '{name}'.{did_you_mean(name, known)} "
                f"Known: {', '.join(known)}."
            ) from None
        return cls(module.tool_call_start, module.tool_call_end or "", module.parse_tool_call)


class ToolCallSplitter:
    """One answer's text split into plain text and tool calls as it streams.

    Feed it the answer text of each token (:meth:`add`), then :meth:`finish` once the
    answer has ended; ``tools`` (the request's) lets parsers type the arguments.
    """

    def __init__(self, fmt: ToolFormat, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        from mlx_lm.generate import TextStateMachine

        self.format = fmt
        self.tools = list(tools) if tools else None
        ends = [(fmt.end, _TEXT)] if fmt.end else []  # no end marker: calls run to the end
        self.machine = TextStateMachine({_TEXT: [(fmt.start, _TOOL)], _TOOL: ends})
        self.state = self.machine.make_state(_TEXT)
        self.body = ""  # the text of the call being written
        self.count = 0  # calls made so far

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> ToolCallSplitter | None:
        """A splitter for the calls ``tokenizer``'s model writes; ``None`` if it writes none."""
        fmt = ToolFormat.of(tokenizer)
        return None if fmt is None else cls(fmt, tools)

    @property
    def made_calls(self) -> bool:
        return self.count > 0

    def add(self, text: str) -> ToolPiece:
        """What ``text``, the next stretch of the answer, adds to the text and the calls."""
        before = self.state[0]
        self.state, segments = self.machine.split(self.state, text)
        return self._take(before, segments)

    def finish(self, text: str = "") -> ToolPiece:
        """As :meth:`add`, then what was held back, once the answer has ended. A call still
        open is read as it stands (a family without an end marker ends its calls so)."""
        before = self.state[0]
        self.state, segments = self.machine.split(self.state, text)
        self.state, held, current = self.machine.flush(self.state)
        piece = self._take(before, segments)
        if current != _TOOL:
            return ToolPiece(piece.text + held, piece.calls)
        self.body += held
        return ToolPiece(*_join(piece, self._close(ended=False)))

    def finish_reason(self, reason: str | None) -> str | None:
        """The answer's finish reason: ``"tool_calls"`` for one that stopped after a call."""
        return "tool_calls" if reason == "stop" and self.made_calls else reason

    def _take(self, before: str, segments: list[tuple[str, str]]) -> ToolPiece:
        text: list[str] = []
        calls: list[ToolCall] = []
        state = before
        for index, (now, segment) in enumerate(segments):
            if index > 0 and state == _TOOL:  # the end marker closed the call
                closed = self._close(ended=True)
                text.append(closed.text)
                calls += closed.calls
            if now == _TOOL:
                self.body += segment
            else:
                text.append(segment)
            state = now
        return ToolPiece("".join(text), calls)

    def _close(self, *, ended: bool) -> ToolPiece:
        body, self.body = self.body, ""
        try:
            parsed = [_read_call(c) for c in _as_list(self.format.parse(body, self.tools))]
            if not parsed:
                raise ValueError("no call in the text")
        except Exception as e:  # any parser failure: the model's text is kept
            log.warning(
                "A tool call could not be read (%s: %s); kept as text.", type(e).__name__, e
            )
            return ToolPiece(self.format.start + body + (self.format.end if ended else ""), [])
        calls = [ToolCall(self.count + k, *call) for k, call in enumerate(parsed)]
        self.count += len(calls)
        return ToolPiece("", calls)


def _read_call(parsed: Any) -> tuple[str, str, str]:
    """(id, name, arguments as JSON text) of one call an mlx-lm parser read."""
    if not isinstance(parsed, Mapping) or not isinstance(parsed.get("name"), str):
        raise ValueError(f"not a call with a name: {parsed!r}")
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    call_id = parsed.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
    return call_id, parsed["name"], arguments


def _as_list(parsed: Any) -> list[Any]:
    return list(parsed) if isinstance(parsed, list) else [parsed]


def _join(first: ToolPiece, second: ToolPiece) -> tuple[str, list[ToolCall]]:
    return first.text + second.text, first.calls + second.calls


# -- the request's tools, tool_choice and tool messages --------------------------------------


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI's ``tools`` checked: a list of ``{"type": "function", "function": {...}}``.

    Returns the tools as plain dicts for the chat template (``None`` for none).

    Raises:
        ConfigError: one line naming the first bad entry.
    """
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ConfigError(
            'tools must be a list of {"type": "function", "function": {"name": ...}}, '
            f"got {type(tools).__name__}."
        )
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ConfigError(f"{where} must be an object, got {type(tool).__name__}.")
        if tool.get("type") != "function":
            raise ConfigError(f"{where}.type must be 'function', got {tool.get('type')!r}.")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ConfigError(f'{where}.function must be an object: {{"name": ..., ...}}.')
        name = _function_name(function.get("name"), f"{where}.function.name")
        if name in names:
            raise ConfigError(f"{where}.function.name '{name}' is given twice.")
        names.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ConfigError(f"{where}.function.description must be a string.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ConfigError(
                f"{where}.function.parameters must be a JSON Schema object, "
                f"got {type(parameters).__name__}."
            )
        if "strict" in function and not isinstance(function["strict"], (bool, type(None))):
            raise ConfigError(f"{where}.function.strict must be true or false.")
        out.append({"type": "function", "function": dict(function)})
    return out or None


def _function_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where} must be 1-64 letters, digits, '_', '.' or '-', got {name!r}.")
    return name


@dataclass(frozen=True)
class ToolChoice:
    """A checked ``tool_choice``: ``mode`` none, auto or required; ``name`` of a forced
    function (mode ``required``)."""

    mode: str
    name: str | None = None

    def template_tools(self, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """The tools to show the model: none for ``"none"``, else the request's."""
        return None if self.mode == "none" else tools


def check_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """OpenAI's ``tool_choice`` checked against the (checked) ``tools``.

    ``"none"``, ``"auto"`` (the default with tools), ``"required"`` or
    ``{"type": "function", "function": {"name": ...}}`` naming one of the tools.
    """
    names = [t["function"]["name"] for t in tools or ()]
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ConfigError(
                f"tool_choice {choice!r} is not supported.{did_you_mean(choice, TOOL_CHOICES)} "
                f"Use {', '.join(TOOL_CHOICES)} or a function."
            )
        if choice == "required" and not names:
            raise ConfigError("tool_choice 'required' needs tools: give the request's tools.")
        return ToolChoice(choice)
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if (
        not isinstance(choice, Mapping)
        or choice.get("type") != "function"
        or not (isinstance(function, Mapping))
    ):
        raise ConfigError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}.'
        )
    name = function.get("name")
    if name not in names:
        known = f"The tools are: {', '.join(names)}." if names else "The request has no tools."
        hint = did_you_mean(name, names) if isinstance(name, str) else ""
        raise ConfigError(
            f"tool_choice names {name!r}, which is not among the tools.{hint} {known}"
        )
    return ToolChoice("required", name)


def tool_choice_grammar(
    fmt: ToolFormat, tools: list[dict[str, Any]] | None, choice: ToolChoice
) -> str | None:
    """An llguidance grammar that makes the answer call the tools ``choice`` asks for.

    For ``"required"`` one or more calls of any of the tools, for a named function one call
    of it, each with arguments of the tool's ``parameters`` schema (keywords the grammar
    does not implement are ignored). Only for calls written as JSON between the markers
    (mlx-lm's ``json_tools``: Qwen, Hermes); ``None`` for any other format, and when the
    choice leaves the model free (``"auto"``, ``"none"``).
    """
    json_calls = getattr(fmt.parse, "__module__", "") == "mlx_lm.tool_parsers.json_tools"
    if choice.mode != "required" or not tools or not json_calls:
        return None
    from .structured import JSON_LAYOUT

    chosen = [t["function"] for t in tools if choice.name in (None, t["function"]["name"])]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    body = {"anyOf": calls, "x-guidance": {**JSON_LAYOUT, "lenient": True}}
    more = "" if choice.name else ' ("\\n" block)*'
    return (
        f"start: block{more}\n"
        f'block: {json.dumps(fmt.start)} "\\n"? call "\\n"? {json.dumps(fmt.end)}\n'
        f"call: %json {json.dumps(body)}"
    )


def tool_choice_processor(
    tokenizer: Any, tools: list[dict[str, Any]] | None, choice: ToolChoice
) -> Any:
    """A fresh row processor (:class:`~layerdecode.structured.GrammarProcessor`) for
    :func:`tool_choice_grammar`, or ``None`` where that is ``None``.

    Raises:
        ConfigError: a tool's ``parameters`` schema cannot be compiled, or llguidance is
            not installed.
    """
    fmt = ToolFormat.of(tokenizer)
    grammar = None if fmt is None else tool_choice_grammar(fmt, tools, choice)
    if grammar is None:
        return None
    from .structured import GrammarProcessor, check_grammar

    check_grammar(grammar, "tools' parameters")
    return GrammarProcessor(tokenizer, grammar)


def is_tool_message(message: Mapping[str, Any]) -> bool:
    """A ``role: "tool"`` message, or an assistant message that made tool calls."""
    role = message.get("role")
    return role == "tool" or (role == "assistant" and bool(message.get("tool_calls")))


def check_tool_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """A tool result or an assistant's tool calls, as chat templates read them.

    A ``role: "tool"`` message needs ``tool_call_id`` and its content (text); an assistant
    message's ``tool_calls`` get their ``arguments`` as objects (templates iterate over them),
    with ``content`` ``""`` when there was none.
    """
    where = f"messages[{index}]"
    role = message.get("role")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ConfigError(f"{where} (role 'tool') needs tool_call_id: the id of the call.")
        out = {"role": "tool", "tool_call_id": call_id, "content": _text(message, where)}
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        return out
    if role != "assistant":
        raise ConfigError(f"{where} with role {role!r} cannot carry tool calls.")
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise ConfigError(f"{where}.tool_calls must be a list of calls.")
    checked = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise ConfigError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{...}}}}.'
            )
        name = _function_name(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                raise ConfigError(f"{at}.function.arguments is not JSON: {e}.") from None
        if not isinstance(arguments, Mapping):
            raise ConfigError(f"{at}.function.arguments must be a JSON object.")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        checked.append(entry)
    content = _text(message, where) if message.get("content") is not None else ""
    return {"role": "assistant", "content": content, "tool_calls": checked}


def _text(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ConfigError(f"{where}.content must be text (a string or a list of text parts).")
