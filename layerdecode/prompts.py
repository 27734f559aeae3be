"""From what a user typed (or a task built) to prompt token ids, for every face alike.

:func:`build_prompt` is used by the CLI, eval and the server: a chat template when the
tokenizer has one (with an optional system message), else the text as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError

Messages = Sequence[Mapping[str, Any]]

# apply_chat_template arguments that build_prompt sets itself.
RESERVED_TEMPLATE_KEYS = ("conversation", "add_generation_prompt", "tokenize", "return_dict")


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


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """Chat template keyword arguments as a dict; anything else is a ``ConfigError``."""
    if not isinstance(kwargs, Mapping):
        raise ConfigError(
            "chat_template_kwargs must be an object of template arguments, e.g. "
            f'{{"enable_thinking": false}}, got {type(kwargs).__name__}.'
        )
    reserved = [key for key in RESERVED_TEMPLATE_KEYS if key in kwargs]
    if reserved:
        raise ConfigError(f"chat_template_kwargs may not set {', '.join(reserved)}.")
    return dict(kwargs)


def _text_of(messages: Messages) -> str:
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def build_prompt(
    tokenizer: Any,
    prompt: str | Messages,
    *,
    system: str | None = None,
    chat: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids for a prompt text or a list of chat messages.

    With ``chat`` and a tokenizer that has a chat template, the messages (a text becomes
    one user message, after the ``system`` message if given) go through the template with
    the generation prompt added, and with ``chat_template_kwargs`` (e.g.
    ``{"enable_thinking": False}``) as the template's further arguments. ``tools``
    (OpenAI's function tools, see :func:`layerdecode.toolcalls.check_tools`) go to the
    template too. Otherwise the text -- the system message and the messages' contents
    joined by blank lines -- is encoded as mlx-lm encodes a prompt.
    """
    template_kwargs = {}
    if chat_template_kwargs is not None:
        template_kwargs = check_template_kwargs(chat_template_kwargs)
    if tools:
        template_kwargs["tools"] = list(tools)
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
        from jinja2 import TemplateError

        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **template_kwargs
            )
        except TemplateError as e:  # the template's own check of the messages
            reason = " ".join(str(e).split())
            raise ConfigError(f"The chat template rejected the messages: {reason}") from None
        if isinstance(ids, Mapping):  # some tokenizers answer a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return encode_prompt(tokenizer, _text_of(messages)).tolist()


def with_chat_template(tokenizer: Any, template: str) -> Any:
    """``tokenizer`` (mlx-lm's ``TokenizerWrapper``) with another chat template: a Jinja
    template, or the path of a file holding one. mlx-lm reads the template again for the
    model family's tool-call markers and parser, as when it loads a model's tokenizer."""
    import os
    import tempfile
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    if "{" not in template:
        raise ConfigError(
            f"--chat-template: {template[:60]!r} is neither a file nor a Jinja template."
        )
    hf = tokenizer._tokenizer
    before = hf.chat_template
    with tempfile.TemporaryDirectory() as folder:
        hf.chat_template = template
        try:
            hf.save_pretrained(folder)
        finally:
            hf.chat_template = before
        return load_tokenizer(Path(folder), eos_token_ids=list(tokenizer.eos_token_ids))
