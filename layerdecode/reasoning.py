"""Reasoning and answer: which part of a model's output each piece of text belongs to.

Thinking models reason before they answer: in ``<think>...</think>`` blocks (Qwen3 and
others, switched by the chat template's ``enable_thinking``), in Gemma 4's thought channel,
or in gpt-oss's harmony channels (``analysis``, then the answer in ``final``). The output
text is split as mlx_lm.server splits it: mlx-lm's ``TextStateMachine`` strips the markers,
with the transitions mlx-lm builds for the tokenizer, and with harmony's (which mlx-lm does
not know) when the vocabulary has ``<|channel|>`` and ``<|message|>``.

The machine's ``normal`` state is the answer and ``reasoning`` the reasoning; any other
state (a harmony header) is markup and dropped. A token belongs to the answer when it is
read entirely in the answer state; reasoning text and the markers around it belong to the
reasoning.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # mlx-lm is imported on first use: eval statistics need none of it
    from mlx_lm.generate import TextStateMachine

REASONING = "reasoning"
ANSWER = "answer"

_ANSWER_STATE = "normal"
_REASONING_STATE = "reasoning"

HARMONY_MARKERS = ("<|channel|>", "<|message|>")
"""A vocabulary holding both speaks harmony (gpt-oss)."""

# A message ends at <|end|> (or the EOS markers <|return|>, <|call|>); the next header names
# its channel in the first word after <|channel|>; its text starts after <|message|>.
_HARMONY_ENDS = [
    ("<|end|>", "header"),
    ("<|start|>", "header"),
    ("<|return|>", "header"),
    ("<|call|>", "header"),
    ("<|channel|>", "channel"),
]
HARMONY_TRANSITIONS: dict[str, list[tuple[str, str]]] = {
    _ANSWER_STATE: _HARMONY_ENDS,
    _REASONING_STATE: _HARMONY_ENDS,
    "header": [("<|channel|>", "channel"), ("<|message|>", _ANSWER_STATE)],
    "channel": [
        ("final", "to-answer"),
        ("analysis", "to-reasoning"),
        ("commentary", "to-reasoning"),
        ("<|message|>", _REASONING_STATE),
    ],
    "to-answer": [("<|message|>", _ANSWER_STATE)],
    "to-reasoning": [("<|message|>", _REASONING_STATE)],
}
"""gpt-oss's harmony channels as TextStateMachine transitions: only ``final`` is the answer."""


class Piece(NamedTuple):
    """The answer and reasoning text some output released, and the part it belongs to."""

    text: str
    reasoning: str
    part: str


class _WithoutTools:
    """A tokenizer as ``make_text_state_machine`` sees it here: tool calls stay answer text."""

    has_tool_calling = False

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class OutputFormat(NamedTuple):
    """How one tokenizer marks reasoning: the machine's transitions and harmony's markers."""

    machine: TextStateMachine
    harmony_start: int | None  # the id of <|start|> for a harmony vocabulary


_formats: weakref.WeakKeyDictionary[Any, OutputFormat] = weakref.WeakKeyDictionary()


def output_format(tokenizer: Any) -> OutputFormat:
    """The reasoning markers of ``tokenizer`` (an mlx-lm ``TokenizerWrapper``), read once."""
    from mlx_lm.generate import TextStateMachine, make_text_state_machine

    try:
        return _formats[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    if all(marker in vocab for marker in HARMONY_MARKERS):
        found = OutputFormat(TextStateMachine(HARMONY_TRANSITIONS), vocab.get("<|start|>"))
    else:
        found = OutputFormat(make_text_state_machine(_WithoutTools(tokenizer)), None)
    with contextlib.suppress(TypeError):  # not weakly referable: read it again next time
        _formats[tokenizer] = found
    return found


def initial_state(tokenizer: Any, prompt: Sequence[int]) -> str:
    """The state the output starts in, from the prompt, as mlx_lm.server decides it.

    A prompt that ends inside an open think block starts the output in the reasoning; a
    harmony prompt starts it where its last message header (from ``<|start|>`` on) leaves
    the machine, which is a header after ``<|start|>assistant``.
    """
    found = output_format(tokenizer)
    if found.harmony_start is not None:
        starts = [i for i, token in enumerate(prompt) if token == found.harmony_start]
        if not starts:
            return _ANSWER_STATE
        tail = tokenizer.decode(list(prompt[starts[-1] :]))
        state, _ = found.machine.split(found.machine.make_state(_ANSWER_STATE), tail)
        return state[0]
    state = _ANSWER_STATE
    if tokenizer.has_thinking and prompt:
        prompt = list(prompt)
        if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            state = _REASONING_STATE
    return tokenizer.response_initial_state or state


class ReasoningSplitter:
    """One sequence's output text split into reasoning and answer as it streams.

    Text that may be the start of a marker is held back until it is known not to be.
    The whitespace a marker leaves before the text that follows it is dropped.
    """

    def __init__(self, machine: TextStateMachine, initial: str = _ANSWER_STATE) -> None:
        self.machine = machine
        self.state = machine.make_state(initial)
        self.after_marker = initial != _ANSWER_STATE

    @classmethod
    def for_prompt(cls, tokenizer: Any, prompt: Sequence[int] = ()) -> ReasoningSplitter:
        """A splitter for the output ``tokenizer`` writes after ``prompt``."""
        return cls(output_format(tokenizer).machine, initial_state(tokenizer, prompt))

    def add(self, text: str) -> Piece:
        """What ``text``, the next stretch of output, adds to the answer and the reasoning."""
        before = self.state[0]
        self.state, segments = self.machine.split(self.state, text)
        return self._piece(before, segments)

    def finish(self, text: str = "") -> Piece:
        """As :meth:`add`, then the text held back, once the output has ended."""
        before = self.state[0]
        self.state, segments = self.machine.split(self.state, text)
        self.state, held, current = self.machine.flush(self.state)
        return self._piece(before, [*segments, (current, held)])

    def _piece(self, before: str, segments: list[tuple[str, str]]) -> Piece:
        answer, reasoning = [], []
        states = {before}
        for index, (state, text) in enumerate(segments):
            states.add(state)
            if index > 0:  # a marker was passed
                self.after_marker = True
            if self.after_marker:
                text = text.lstrip()
                self.after_marker = not text
            if state == _ANSWER_STATE:
                answer.append(text)
            elif state == _REASONING_STATE:
                reasoning.append(text)
        part = ANSWER if states == {_ANSWER_STATE} else REASONING
        return Piece("".join(answer), "".join(reasoning), part)


def split_reasoning(
    tokenizer: Any, text: str, prompt: Sequence[int] = ()
) -> tuple[str, str | None]:
    """(answer, reasoning) of a whole output text; reasoning is None when there was none."""
    piece = ReasoningSplitter.for_prompt(tokenizer, prompt).finish(text)
    return piece.text, piece.reasoning if piece.part == REASONING else None


def layers_by_part(layers: Iterable[int], parts: Sequence[str]) -> dict[str, list[int]]:
    """The layers of each part's tokens, reasoning first; no parts means all answer."""
    layers = list(layers)
    if not parts:
        return {ANSWER: layers}
    split: dict[str, list[int]] = {REASONING: [], ANSWER: []}
    for layer, part in zip(layers, parts, strict=True):
        split[part].append(layer)
    return split
