"""Generated tokens -> streamed text, and when a sequence ends.

One :class:`OutputStream` per sequence (a single run or one row of a batch): it feeds
mlx-lm's streaming detokenizer, ends the sequence at an end-of-sequence token, a stop
sequence or the token budget, never streams text that may turn out to be the start
of a stop sequence, and splits the text into reasoning and answer
(:mod:`layerdecode.reasoning`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .reasoning import ReasoningSplitter


class TextStream:
    """Streaming detokenization of one sequence that watches for stop sequences.

    The text handed out never contains a stop sequence, nor a tail that could still
    become one; :attr:`matched` is the stop sequence found, if any.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per call
        self.detokenizer.reset()
        self.stop = tuple(stop)
        self.emitted = 0
        self.matched: str | None = None

    def add(self, token: int) -> str:
        """Text released by ``token`` (may be empty)."""
        self.detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once the sequence has ended."""
        self.detokenizer.finalize()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self.detokenizer.text
        end = len(text)
        if self.stop and self.matched is None:
            found = [(i, s) for s in self.stop if (i := text.find(s, self.emitted)) >= 0]
            if found:
                end, self.matched = min(found)
            elif not final:
                end = self._safe_end(text)
        elif self.matched is not None:
            return ""
        segment = text[self.emitted : end]
        self.emitted = end
        return segment

    def _safe_end(self, text: str) -> int:
        """Where text may be released: before any tail that starts a stop sequence."""
        end = len(text)
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                if text.endswith(stop[:size]):
                    end = min(end, len(text) - size)
                    break
        return end


class Released(NamedTuple):
    """What one token releases: answer text, reasoning text, the token's part
    (``"reasoning"`` or ``"answer"``) and the finish reason if the sequence ends there."""

    text: str
    reasoning: str
    part: str
    finish: str | None


class OutputStream:
    """One sequence's text and its end: EOS token, stop sequence or ``max_tokens``.

    ``max_tokens`` of -1 means no limit. ``prompt`` (its token ids) tells whether the
    output starts inside a reasoning block the prompt opened. Stop sequences are matched
    in the text as generated, markers and reasoning included. ``eos``: the token ids that
    end the sequence (default: the tokenizer's end of sequence).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        prompt: Sequence[int] = (),
        eos: Iterable[int] | None = None,
    ) -> None:
        self.text = TextStream(tokenizer, stop)
        self.parts = ReasoningSplitter.for_prompt(tokenizer, prompt)
        self.eos = set(tokenizer.eos_token_ids if eos is None else eos)
        self.max_tokens = max_tokens
        self.count = 0

    @property
    def matched_stop(self) -> str | None:
        return self.text.matched

    def feed(self, token: int) -> Released:
        """What ``token`` releases, and the finish reason if the sequence ends here."""
        self.count += 1
        if token in self.eos:
            return self._end(self.text.finish(), "stop")
        segment = self.text.add(token)
        if self.text.matched is not None:
            return self._end(segment, "stop")
        if self.count == self.max_tokens:
            return self._end(segment + self.text.finish(), "length")
        return Released(*self.parts.add(segment), None)

    def _end(self, segment: str, finish: str) -> Released:
        return Released(*self.parts.finish(segment), finish)
