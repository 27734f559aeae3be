"""What the commands read and print: prompts, model loading with progress, JSON, error lines."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

EXIT_INTERRUPTED = 130


def usage(message: str) -> click.UsageError:
    """A usage error (exit 2) tied to the running command, so its help hint names it."""
    return click.UsageError(message, ctx=click.get_current_context(silent=True))


def say_error(message: str) -> None:
    message = " ".join(str(message).split())  # one line, whatever the exception held
    click.echo(f"error: {message}", err=True)


def stdout_console(*, soft_wrap: bool = False, wide: bool = False) -> Console:
    """Rich output on stdout; ``wide`` keeps summary tables readable when piped."""
    from rich.console import Console

    width = 160 if wide and not sys.stdout.isatty() else None
    return Console(highlight=False, soft_wrap=soft_wrap, width=width)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def echo_json(data: Any, *, indent: int | None = None) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=indent, default=str))


def read_prompt(prompt: str | None) -> str:
    """The prompt text; ``-`` (or no --prompt with stdin piped) reads stdin."""
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    elif prompt is None:
        raise usage("No prompt: pass --prompt TEXT (or --prompt - to read stdin).")
    if not prompt.strip():
        raise usage("The prompt is empty: give some text.")
    return prompt


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a JSON-lines file with a ``prompt`` field per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise usage(f"Cannot read {path}: {e.strerror or e}.") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise usage(f"{path} line {number}: not valid JSON ({e.msg}).") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise usage(f"{path} line {number}: needs a non-empty string field 'prompt'.")
        prompts.append(prompt)
    if not prompts:
        raise usage(f"{path} holds no prompts.")
    return prompts


def load_model(name: str | None, dtype: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) from the loader, with progress on stderr."""
    from layerdecode.loading import DEFAULT_MODEL, load

    console = stderr_console()
    if not console.is_terminal:  # plain lines, so a first-time download is still visible
        return load(name, dtype=dtype, progress=lambda msg: console.print(str(msg)))
    with console.status(f"loading {name or DEFAULT_MODEL}") as status:
        return load(name, dtype=dtype, progress=lambda msg: status.update(str(msg)))
