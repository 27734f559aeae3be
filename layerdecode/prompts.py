"""From what a user typed (or a task built) to prompt token ids, for every face alike.

:func:`build_prompt` is used by the CLI, eval and the server: a chat template when the
tokenizer has one (with an optional system message), else the text as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError

Messages = Sequence[Mapping[str, Any]]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer (mlx-lm's wrapper or a transformers one) has a chat template."""
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | Any) -> Any:
    """Prompt ids as an ``mx.array``, the way mlx-lm makes them (BOS unless the text has one)."""
    import mlx.core as mx

    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigError("The prompt is empty: give some text.")
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(list(prompt), dtype=mx.uint32)


def _text_of(messages: Messages) -> str:
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def build_prompt(
    tokenizer: Any,
    prompt: str | Messages,
    *,
    system: str | None = None,
    chat: bool = True,
) -> list[int]:
    """Token ids for a prompt text or a list of chat messages.

    With ``chat`` and a tokenizer that has a chat template, the messages (a text becomes
    one user message, after the ``system`` message if given) go through the template with
    the generation prompt added. Otherwise the text -- the system message and the
    messages' contents joined by blank lines -- is encoded as mlx-lm encodes a prompt.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("The prompt is empty: give some text.")
        messages: list[Mapping[str, Any]] = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages:
            raise ConfigError("The prompt has no messages: give at least one.")
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    if chat and has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, Mapping):  # some tokenizers answer a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return encode_prompt(tokenizer, _text_of(messages)).tolist()
