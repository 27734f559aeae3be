"""One request's answer in OpenAI's shapes: whole, or as server-sent event chunks.

A request has ``n`` choices (its samples); their tokens arrive as events keyed by choice
index, mixed in the order the engine steps them. Each choice keeps its own text, tool-call
splitter and per-token figures; the ``layerdecode`` extension of a choice carries the layer,
entropy, "changed" flag and head rows of each of its tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ..engine import TokenEvent
from ..layerstats import token_stats
from ..toolcalls import ToolCallSplitter
from .worker import Job, PromptScores


class Choice:
    """One sample's state while it streams."""

    def __init__(self, index: int, splitter: ToolCallSplitter | None) -> None:
        self.index = index
        self.splitter = splitter
        self.layers: list[int] = []
        self.changed: list[bool | None] = []
        self.head_rows: list[int] = []
        self.count = 0
        self.finish: str | None = None
        self.calls: list[dict[str, Any]] = []

    def track(self, kept: list[TokenEvent]) -> None:
        self.count += len(kept)
        self.layers += [e.layer for e in kept]
        self.changed += [e.changed for e in kept]
        self.head_rows += [e.head_rows for e in kept]


class Answer:
    """The answer to ``job``: ``chat`` or completion shapes, with ``echo`` of the prompt."""

    def __init__(self, job: Job, tokenizer: Any, *, chat: bool, tools: Any = None) -> None:
        self.job = job
        self.chat = chat
        self.tokenizer = tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"
        self.created = int(time.time())
        self.choices = [
            Choice(i, ToolCallSplitter.for_tokenizer(tokenizer, tools) if tools else None)
            for i in range(job.n)
        ]
        self.prompt: PromptScores | None = None
        self.num_layers = 0
        self.prompt_tokens = len(job.prompt)
        self.cached_tokens = 0

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    # -- the parts of a choice ------------------------------------------------------------

    def take(self, items: Iterable[TokenEvent | PromptScores]) -> dict[int, list[TokenEvent]]:
        """Sort what arrived by choice; a prompt's scores are kept for the echo."""
        by_choice: dict[int, list[TokenEvent]] = {}
        for item in items:
            if isinstance(item, PromptScores):
                self.prompt = item
                continue
            by_choice.setdefault(item.row[1], []).append(item)
        return by_choice

    def extension(
        self, choice: Choice, events: list[TokenEvent], *, summary: bool, pieces: bool = False
    ) -> dict[str, Any]:
        kept = [e for e in events if e.in_output]
        out: dict[str, Any] = {
            "layers": [e.layer for e in kept],
            "entropies": [round(e.entropy, 4) for e in kept],
            "parts": [e.part for e in kept],
            "changed": [e.changed for e in kept],
            "head_rows": [e.head_rows for e in kept],
        }
        if pieces:  # the text each token released, to colour it (streams only)
            out["pieces"] = [e.reasoning + e.text for e in kept]
            out["num_layers"] = self.num_layers
        if summary:
            resolved = self.job.resolved
            stats = token_stats(
                choice.layers, self.num_layers - 1, choice.changed, choice.head_rows
            )
            out = {
                "strategy": resolved.label,
                "params": resolved.strategy.resolved_params(),
                "num_layers": self.num_layers,
                **out,
                "non_final_share": _round(stats.non_final_share or 0.0),
                "changed_share": _round(stats.changed_share),
                "extra_head_rows_per_token": _round(stats.extra_head_rows),
            }
        return out

    def logprobs(self, events: list[TokenEvent], *, echo: bool = False) -> dict[str, Any] | None:
        if self.job.logprobs is None:
            return None
        decode = self.tokenizer.decode
        kept = [e for e in events if e.in_output]
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
        tokens = [e.token for e in kept]
        values: list[float | None] = [e.logprob for e in kept]
        tops = [e.top_logprobs or [] for e in kept]
        if echo and self.prompt is not None:  # the prompt's own tokens first
            tokens = [*self.prompt.tokens, *tokens]
            values = [*self.prompt.logprobs, *values]
            tops = [*self.prompt.top_logprobs, *tops]
        return {
            "tokens": [decode([t]) for t in tokens],
            "token_logprobs": values,
            "top_logprobs": [
                None if v is None else {decode([i]): lp for i, lp in top}
                for v, top in zip(values, tops, strict=True)
            ],  # fmt: skip
        }

    def body(self, choice: Choice, events: list[TokenEvent], *, key: str, role: bool,
             final: bool, echo: bool = False) -> dict[str, Any]:  # fmt: skip
        """The text, reasoning and tool calls ``events`` add to ``choice``, in its shape:
        under ``key`` (message, delta) for chat, as ``text`` otherwise."""
        text = "".join(e.text for e in events)
        calls = []
        if choice.splitter is not None:
            piece = choice.splitter.finish(text) if final else choice.splitter.add(text)
            text, calls = piece.text, piece.calls
        out: dict[str, Any] = {"role": "assistant"} if role and self.chat else {}
        if echo:
            text = self._echoed(events, text)
        out["content" if self.chat else "text"] = text
        reasoning = "".join(e.reasoning for e in events)
        if reasoning:  # as mlx_lm.server: only when there is some
            out["reasoning"] = reasoning
        if calls:
            choice.calls += [c.message() for c in calls]
            out["tool_calls"] = [c.delta() if key == "delta" else c.message() for c in calls]
        return {key: out} if self.chat else out

    def _echoed(self, events: list[TokenEvent], text: str) -> str:
        """The prompt's text, then ``text``: decoded together where that gives the same
        answer, so that the space the answer's first token begins with is kept."""
        prompt = self.tokenizer.decode(self.job.prompt)
        tokens = [e.token for e in events if e.in_output]
        if text and tokens:
            whole = self.tokenizer.decode([*self.job.prompt, *tokens])
            if whole.startswith(prompt) and whole.endswith(text):
                return whole
        return prompt + text

    def finish_reason(self, choice: Choice, events: list[TokenEvent]) -> str | None:
        reason = events[-1].finish_reason if events else None
        if reason is not None and choice.splitter is not None:
            reason = choice.splitter.finish_reason(reason)
        return reason

    def note(self, events: list[TokenEvent]) -> None:
        last = events[-1]
        self.num_layers = last.num_layers
        self.prompt_tokens, self.cached_tokens = last.prompt_tokens, last.cached_tokens

    # -- the shapes ------------------------------------------------------------------------

    def whole(self, items: list[TokenEvent | PromptScores]) -> dict[str, Any]:
        by_choice = self.take(items)
        choices = []
        for choice in self.choices:
            events = by_choice.get(choice.index, [])
            if events:
                self.note(events)
            kept = [e for e in events if e.in_output]
            choice.track(kept)
            body = self.body(choice, events, key="message", role=True, final=True,
                             echo=self.job.echo is not None)  # fmt: skip
            choice.finish = self.finish_reason(choice, events)
            choices.append(
                {
                    "index": choice.index,
                    "finish_reason": choice.finish,
                    **body,
                    "logprobs": self.logprobs(events, echo=self.job.echo is not None),
                    "layerdecode": self.extension(choice, events, summary=True),
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, items: list[TokenEvent | PromptScores], *, first: bool) -> dict[str, Any]:
        """One chunk: a choice for each sample that moved (every sample in the first)."""
        by_choice = self.take(items)
        choices = []
        for choice in self.choices:
            events = by_choice.get(choice.index, [])
            if not events and not first:
                continue
            if events:
                self.note(events)
            finish = events[-1].finish_reason if events else None
            kept = [e for e in events if e.in_output]
            choice.track(kept)
            part: dict[str, Any] = {"index": choice.index}
            part.update(self.body(choice, events, key="delta", role=first,
                                  final=finish is not None,
                                  echo=first and self.job.echo is not None))  # fmt: skip
            if finish is not None:
                choice.finish = finish = self.finish_reason(choice, events)
            part["finish_reason"] = finish
            part["logprobs"] = self.logprobs(events, echo=first and self.job.echo is not None)
            if events:
                part["layerdecode"] = self.extension(
                    choice, events, summary=finish is not None, pieces=True
                )
            choices.append(part)
        return self.envelope(choices)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.count for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def envelope(self, choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
            **more,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
