"""Reusable option decorators and the parsing of their values.

The generation flags (``--temp`` ... ``--stop``) are derived from
:func:`layerdecode.option_fields`, so a new field of ``GenerationOptions`` is a new flag
on every command that generates, with its range and help.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from layerdecode.loading import DEFAULT_MODEL
from layerdecode.options import option_fields

from .console import usage

if TYPE_CHECKING:
    from layerdecode.config import ResolvedStrategy
    from layerdecode.options import GenerationOptions, OptionField

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

Decorator = Callable[[Callable], Callable]


def stack(*decorators: Decorator) -> Decorator:
    """Several option decorators as one, applied in the order they are listed."""

    def wrap(f: Callable) -> Callable:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return wrap


model_options = stack(
    click.option(
        "-m",
        "--model",
        envvar="LAYERDECODE_MODEL",
        show_envvar=True,
        metavar="NAME|PATH",
        help="Model to load: a manifest name (see 'layerdecode models list'), a local "
        "mlx-lm directory, a .gguf file or a Hugging Face repo id. "
        f"[default: {DEFAULT_MODEL}]",
    ),
    click.option(
        "--dtype",
        metavar="DTYPE",
        help="Convert the weights on load, e.g. float16, bfloat16 or float32 [default: as stored].",
    ),
)


def _template_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--chat-template-kwargs``, parsed; bad JSON or not an object is a usage error."""
    import json

    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            f"give a JSON object like '{{\"enable_thinking\": false}}', not {value!r}."
        )
    from layerdecode.errors import ConfigError
    from layerdecode.prompts import check_template_kwargs

    try:
        return check_template_kwargs(parsed)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


chat_template_option = click.option(
    "--chat-template-kwargs",
    "--chat-template-args",  # mlx_lm.server's name for it
    "chat_template_kwargs",
    metavar="JSON",
    callback=_template_kwargs,
    help="Further arguments of the chat template, as a JSON object: "
    "'{\"enable_thinking\": false}' turns a thinking model's reasoning off.",
)

prompt_options = stack(
    click.option(
        "-p",
        "--prompt",
        metavar="TEXT",
        help="The prompt; '-' reads it from stdin (also read from stdin when omitted and "
        "stdin is not a terminal).",
    ),
    click.option("--system", metavar="TEXT", help="System message for the chat template."),
    click.option(
        "--raw",
        is_flag=True,
        help="Send the prompt as is, without the tokenizer's chat template (the template "
        "is applied by default when the tokenizer has one).",
    ),
    chat_template_option,
)

param_option = click.option(
    "-P",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy parameter, overriding the preset's (repeatable). VALUE is read as "
    "YAML: --param window=8, --param layers=[16,20,24], --param method=trough-m1. "
    "See 'layerdecode strategies show NAME'.",
)


def strategy_option(default: str = "final") -> Decorator:
    return click.option(
        "-s",
        "--strategy",
        default=default,
        show_default=True,
        metavar="NAME|PRESET|FILE.yaml",
        help="Exit-layer strategy: a strategy name, a preset name or a YAML preset file "
        "(see 'layerdecode strategies list').",
    )


def strategies_option(baseline: str) -> Decorator:
    """``--strategies A,B,...``; ``baseline`` says what the first one is for."""
    return click.option(
        "-s",
        "--strategies",
        default="final,confident,dola",
        show_default=True,
        metavar="A,B,...",
        help=f"Comma-separated strategies, presets or YAML files; the first is {baseline}.",
    )


def json_option(help: str) -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def batch_size_option(default: int, help: str) -> Decorator:
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def file_option(*decls: str, metavar: str, help: str, **extra: Any) -> Decorator:
    """An option naming a file (not a folder)."""
    return click.option(
        *decls, type=click.Path(dir_okay=False), metavar=metavar, help=help, **extra
    )


summary_output_options = stack(
    file_option(
        "--plot",
        metavar="FILE.png",
        help="Also draw accuracy with intervals and the chosen-layer histogram per strategy.",
    ),
    json_option("Print the summary as JSON."),
)


# -- generation options, derived from GenerationOptions -------------------------------------


def _flag_type(field: OptionField) -> click.ParamType | type:
    if field.minimum is None and field.maximum is None:
        return field.type
    ranged = click.FloatRange if field.type is float else click.IntRange
    return ranged(field.minimum, field.maximum, min_open=field.min_open, max_open=field.max_open)


def _generation_flag(field: OptionField) -> Decorator:
    return click.option(
        field.flag,
        field.name,
        type=_flag_type(field),
        multiple=field.multiple,
        metavar="TEXT" if field.type is str else None,
        help=field.help + (" Repeatable." if field.multiple else ""),
    )


def _max_tokens_flag(default: int | None) -> Decorator:
    # The CLI's own shape: -n, a per-command default and no "-1 = unlimited".
    return click.option(
        "-n",
        "--max-tokens",
        "max_tokens",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help="Maximum number of tokens to generate"
        + (" [default: the preset's, else 256]." if default is None else "."),
    )


def generation_options(max_tokens: int | None) -> Decorator:
    """Every generation flag; ``max_tokens`` is the command's default (None: the preset's)."""
    flags = [
        _max_tokens_flag(max_tokens) if field.name == "max_tokens" else _generation_flag(field)
        for field in option_fields()
    ]
    return stack(*flags)


def chosen_options(values: dict[str, Any]) -> GenerationOptions:
    """The generation options a command was given (unset flags stay unset)."""
    from layerdecode.options import GenerationOptions

    chosen = {}
    for field in option_fields():
        value = values.get(field.name)
        chosen[field.name] = (value or None) if field.multiple else value  # () is "not given"
    return GenerationOptions.build(**chosen)


# -- values ---------------------------------------------------------------------------------


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings -> params; values are YAML scalars or lists."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise usage(f"Malformed --param '{item}': use KEY=VALUE, e.g. --param window=8.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise usage(f"Malformed --param '{item}': the value is not valid YAML.") from None
        if raw.strip() == "" or isinstance(value, dict):
            raise usage(
                f"Malformed --param '{item}': the value must be a number, a string, a boolean "
                "or a list like [1,2]."
            )
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            raise usage(f"Malformed --param '{item}': list items must be plain values.")
        params[key] = value
    return params


def resolve(strategy: str, params: tuple[str, ...]) -> ResolvedStrategy:
    """The validated strategy (raises ConfigError for unknown names and bad params)."""
    from layerdecode.config import resolve_strategy

    return resolve_strategy(strategy, parse_params(params))


def strategy_list(value: str) -> list[str]:
    """The names of a comma-separated --strategies value; a usage error when it is empty."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise usage("--strategies is empty: name at least one, e.g. final,confident.")
    return names


def check_system(system: str | None, raw: bool, template_kwargs: dict | None = None) -> None:
    if system and raw:
        raise usage("--system needs the chat template: drop --raw or put it in the prompt.")
    if template_kwargs is not None and raw:
        raise usage("--chat-template-kwargs needs the chat template: drop --raw.")
