"""Generated tokens -> streamed text, and when a sequence ends.

One :class:`OutputStream` per sequence (a single run or one row of a batch): it feeds
mlx-lm's streaming detokenizer, ends the sequence at an end-of-sequence token, a stop
sequence or the token budget, and never streams text that may turn out to be the start
of a stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


class OutputStream:
    """One sequence's text and its end: EOS token, stop sequence or ``max_tokens``.

    ``max_tokens`` of -1 means no limit.
    """

    def __init__(self, tokenizer: Any, *, max_tokens: int, stop: Sequence[str] = ()) -> None:
        self.text = TextStream(tokenizer, stop)
        self.eos = set(tokenizer.eos_token_ids)
        self.max_tokens = max_tokens
        self.count = 0

    @property
    def matched_stop(self) -> str | None:
        return self.text.matched

    def feed(self, token: int) -> tuple[str, str | None]:
        """The text ``token`` releases and the finish reason if the sequence ends here."""
        self.count += 1
        if token in self.eos:
            return self.text.finish(), "stop"
        segment = self.text.add(token)
        if self.text.matched is not None:
            return segment, "stop"
        if self.count == self.max_tokens:
            return segment + self.text.finish(), "length"
        return segment, None
