"""``strategies`` (list, show, validate) and ``models`` (list, pull, info): what is available."""

from __future__ import annotations

from typing import Any

import click

from .console import echo_json, say_error, stderr_console, stdout_console
from .options import CONTEXT_SETTINGS, json_option


@click.group(
    "strategies",
    context_settings=CONTEXT_SETTINGS,
    short_help="List, show and validate strategies.",
)
def strategies() -> None:
    """List, describe and validate strategies and YAML presets."""


@strategies.command("list", context_settings=CONTEXT_SETTINGS)
@json_option("Print the list as JSON.")
def strategies_list(as_json: bool) -> None:
    """List the strategies (built-in and plugins) and the shipped presets, with their source.

    A preset marked * has the name of its own strategy and stands for it: '-s dola' runs
    the preset 'dola', with its params and generation defaults.
    """
    from layerdecode.config import describe_strategies
    from layerdecode.render import records_table

    rows = describe_strategies()
    if as_json:
        echo_json(rows)
        return
    shown = [{**row, "kind": row["kind"] + ("*" if row["shadows"] else "")} for row in rows]
    columns = ("name", "kind", "strategy", "description", "source")
    out = stdout_console()
    out.print(
        records_table(shown, columns, title="strategies and presets", no_wrap=("name", "kind"))
    )
    shadowing = [row["name"] for row in rows if row["shadows"]]
    if shadowing:
        names = ", ".join(f"-s {name}" for name in shadowing)
        out.print(
            f"* a preset named after its strategy: {names} mean the preset, with its params "
            "and generation defaults (see 'layerdecode strategies show NAME').",
            style="dim",
        )


@strategies.command("show", context_settings=CONTEXT_SETTINGS)
@click.argument("name", metavar="NAME|PRESET|FILE.yaml")
@json_option("Print the description as JSON.")
def strategies_show(name: str, as_json: bool) -> None:
    """Describe a strategy or preset: its params with types, defaults and descriptions.

    For a preset (or a YAML preset file) the values it sets are shown beside the defaults,
    with its generation defaults.
    """
    from rich.text import Text

    from layerdecode.config import describe_strategy
    from layerdecode.render import records_table

    data = describe_strategy(name)
    if as_json:
        echo_json(data)
        return
    preset = data.get("preset")
    out = stdout_console()
    if preset is not None:
        out.print(
            Text.assemble((preset["name"], "bold"), ": preset of strategy ", data["strategy"])
        )
        if preset["description"]:
            out.print(Text(preset["description"]))
        if preset["generation"]:
            values = ", ".join(f"{k}={v}" for k, v in preset["generation"].items())
            out.print(f"generation defaults: {values}")
        out.print("")
    out.print(Text.assemble((data["strategy"], "bold"), f" — {data['description']}"))
    out.print(Text(f"source: {data['source']}", style="dim"))
    if not data["params"]:
        out.print("no params")
        return
    rows = []
    for row in data["params"]:
        shown: dict[str, Any] = {**row, "param": row["name"], "default": repr(row["default"])}
        if preset is not None:
            given = preset["params"]
            shown["preset"] = repr(given[row["name"]]) if row["name"] in given else ""
        rows.append(shown)
    columns = ["param", "type", "default"] + (["preset"] if preset is not None else [])
    out.print(records_table(rows, [*columns, "description"], title="params", no_wrap=("param",)))


@strategies.command("validate", context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=True, metavar="FILE.yaml...")
def strategies_validate(files: tuple[str, ...]) -> None:
    """Check YAML preset files: schema, strategy name and param types.

    Prints one line per file; exits with status 2 when any file is invalid.
    """
    from layerdecode.config import read_preset
    from layerdecode.errors import ConfigError

    bad = 0
    for path in files:
        try:
            preset = read_preset(path)
        except ConfigError as e:
            bad += 1
            say_error(str(e))
            continue
        click.echo(f"ok: {path} (preset '{preset.name}', strategy '{preset.strategy}')")
    if bad:
        raise click.exceptions.Exit(2)


@click.group(
    "models", context_settings=CONTEXT_SETTINGS, short_help="List, pull and describe models."
)
def models() -> None:
    """List, download and describe the models layerdecode knows by name."""


@models.command("list", context_settings=CONTEXT_SETTINGS)
@json_option("Print the list as JSON.")
def models_list(as_json: bool) -> None:
    """List the named models (manifests) and whether each is downloaded."""
    from layerdecode.manifests import manifest_rows
    from layerdecode.render import records_table

    rows = manifest_rows()
    if as_json:
        echo_json(rows)
        return
    # Licence and sources are long: "models info NAME" shows them.
    preferred = ("name", "architecture", "cached", "description")
    columns = [c for c in preferred if any(c in row for row in rows)] or ["name"]
    table = records_table(rows, columns, title="models", no_wrap=("name", "architecture", "cached"))
    stdout_console().print(table)


@models.command("pull", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.option("--dtype", metavar="DTYPE", help="Store the weights in this dtype.")
@click.option("--force", is_flag=True, help="Download again even if already cached.")
def models_pull(name: str, dtype: str | None, force: bool) -> None:
    """Download a named model into the cache (see 'layerdecode models list')."""
    from layerdecode.manifests import pull

    err = stderr_console()
    if err.is_terminal:
        with err.status(f"pulling {name}") as status:
            path = pull(name, dtype=dtype, force=force, progress=lambda m: status.update(str(m)))
    else:
        path = pull(name, dtype=dtype, force=force, progress=lambda m: err.print(str(m)))
    click.echo(f"{name}: {path}")


@models.command("info", context_settings=CONTEXT_SETTINGS)
@click.argument("name", metavar="NAME|PATH")
@json_option("Print the facts as JSON.")
def models_info(name: str, as_json: bool) -> None:
    """Show what is known about a model: manifest, architecture, layers, cache path."""
    from layerdecode.manifests import model_info
    from layerdecode.render import key_value_table

    info = model_info(name)
    if as_json:
        echo_json(info)
        return
    stdout_console().print(key_value_table(info, title=name))
