"""The ``layerdecode`` command line: thin click commands over the public API.

Heavy imports (mlx, the model loaders, matplotlib) happen inside the commands, so
``layerdecode --help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from . import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
EXIT_INTERRUPTED = 130

_state = {"debug": False}


# --------------------------------------------------------------------------- errors


def _say_error(message: str) -> None:
    message = " ".join(str(message).split())  # one line, whatever the exception held
    click.echo(f"error: {message}", err=True)


class LayerdecodeGroup(click.Group):
    """A group that turns every failure into one line on stderr and a meaningful exit code.

    Usage problems (bad options, bad strategy config) exit 2, runtime failures exit 1,
    Ctrl-C exits 130. ``--debug`` prints the traceback as well.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .errors import ConfigError, LayerdecodeError

        _state["debug"] = False
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            self._fail(e.format_message() + hint, 2)
        except click.ClickException as e:
            self._fail(e.format_message(), e.exit_code)
        except click.Abort:
            click.echo("", err=True)
            self._fail("interrupted", EXIT_INTERRUPTED)
        except ConfigError as e:
            self._fail(str(e), 2)
        except LayerdecodeError as e:
            self._fail(str(e), 1)
        except Exception as e:  # the last line of defence: one line, not a traceback
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            hint = "" if _state["debug"] else " (run with --debug for the traceback)"
            self._fail(detail + hint, 1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def _fail(self, message: str, code: int) -> None:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _say_error(message)
        sys.exit(code)


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message, ctx=click.get_current_context(silent=True))


# --------------------------------------------------------------------------- option groups


def _stack(*decorators: Callable) -> Callable:
    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return wrap


model_options = _stack(
    click.option(
        "-m",
        "--model",
        envvar="LAYERDECODE_MODEL",
        show_envvar=True,
        metavar="NAME|PATH",
        help="Model to load: a manifest name (see 'layerdecode models list'), a local "
        "mlx-lm directory, a .gguf file or a Hugging Face repo id. "
        f"[default: {DEFAULT_MODEL_NAME}]",
    ),
    click.option(
        "--dtype",
        metavar="DTYPE",
        help="Convert the weights on load, e.g. float16, bfloat16 or float32 [default: as stored].",
    ),
)

prompt_options = _stack(
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
)


def _param_option(f):
    return click.option(
        "-P",
        "--param",
        "params",
        multiple=True,
        metavar="KEY=VALUE",
        help="Strategy parameter, overriding the preset's (repeatable). VALUE is read as "
        "YAML: --param window=8, --param layers=[16,20,24], --param method=trough-m1. "
        "See 'layerdecode strategies show NAME'.",
    )(f)


def _strategy_option(default: str | None = "final"):
    return click.option(
        "-s",
        "--strategy",
        default=default,
        show_default=True,
        metavar="NAME|PRESET|FILE.yaml",
        help="Exit-layer strategy: a strategy name, a preset name or a YAML preset file "
        "(see 'layerdecode strategies list').",
    )


sampling_options = _stack(
    click.option(
        "--temp",
        type=click.FloatRange(min=0.0),
        help="Sampling temperature; 0 is greedy [default: the preset's, else 0].",
    ),
    click.option(
        "--top-p",
        type=click.FloatRange(0.0, 1.0, min_open=True),
        help="Nucleus sampling: keep the smallest set of tokens with this mass (with --temp).",
    ),
    click.option(
        "--min-p",
        type=click.FloatRange(0.0, 1.0),
        help="Min-p sampling threshold, relative to the top token (with --temp).",
    ),
    click.option(
        "--top-k",
        type=click.IntRange(min=0),
        help="Sample among the k most likely tokens; 0 is off (with --temp).",
    ),
    click.option("--seed", type=int, help="Random seed, for reproducible sampling."),
    click.option(
        "--repetition-penalty",
        type=click.FloatRange(min=0.0, min_open=True),
        help="Penalty for tokens already seen; 1.0 is off [default: the preset's].",
    ),
    click.option(
        "--repetition-context-size",
        type=click.IntRange(min=1),
        help="Tokens the repetition penalty looks back over [default: 20].",
    ),
)


def _max_tokens_option(default: int | None):
    return click.option(
        "-n",
        "--max-tokens",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help="Maximum number of tokens to generate"
        + (" [default: the preset's, else 256]." if default is None else "."),
    )


SAMPLING_KEYS = (
    "temp",
    "top_p",
    "min_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "repetition_context_size",
)


# --------------------------------------------------------------------------- helpers


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings -> params; values are YAML scalars or lists."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise _usage(f"Malformed --param '{item}': use KEY=VALUE, e.g. --param window=8.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise _usage(f"Malformed --param '{item}': the value is not valid YAML.") from None
        if raw.strip() == "" or isinstance(value, dict):
            raise _usage(
                f"Malformed --param '{item}': the value must be a number, a string, a boolean "
                "or a list like [1,2]."
            )
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            raise _usage(f"Malformed --param '{item}': list items must be plain values.")
        params[key] = value
    return params


def resolve(strategy: str, params: tuple[str, ...]):
    """The validated strategy (raises ConfigError for unknown names and bad params)."""
    from .config import resolve_strategy

    return resolve_strategy(strategy, parse_params(params))


def strategy_list(value: str) -> list[str]:
    """The names of a comma-separated --strategies value; a usage error when it is empty."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise _usage("--strategies is empty: name at least one, e.g. final,confident.")
    return names


def read_prompt(prompt: str | None) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    elif prompt is None:
        raise _usage("No prompt: pass --prompt TEXT (or --prompt - to read stdin).")
    if not prompt.strip():
        raise _usage("The prompt is empty: give some text.")
    return prompt


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def load_model(name: str | None, dtype: str | None):
    """(model, tokenizer) from the loader, with progress on stderr when it is a terminal."""
    from .loading import load

    console = _stderr_console()
    if not console.is_terminal:  # plain lines, so a first-time download is still visible
        return load(name, dtype=dtype, progress=lambda msg: console.print(str(msg)))
    with console.status(f"loading {name or DEFAULT_MODEL_NAME}") as status:
        return load(name, dtype=dtype, progress=lambda msg: status.update(str(msg)))


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def prompt_ids(tokenizer, prompt: str, *, system: str | None, raw: bool) -> list[int] | str:
    """Token ids through the chat template, or the text itself with --raw / no template."""
    if raw or not has_chat_template(tokenizer):
        return f"{system}\n\n{prompt}" if system else prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(ids, dict):  # some tokenizers answer a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in SAMPLING_KEYS if kwargs.get(key) is not None}


def _check_system(system: str | None, raw: bool) -> None:
    if system and raw:
        raise _usage("--system needs the chat template: drop --raw or put it in the prompt.")


def _label(resolved) -> str:
    if resolved.preset is not None:
        return resolved.preset.name
    return resolved.strategy.name


# --------------------------------------------------------------------------- the group


@click.group(cls=LayerdecodeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="layerdecode")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
def cli(debug: bool) -> None:
    """Decode each token from the decoder layer a pluggable strategy picks.

    layerdecode runs mlx-lm models and, at every step, lets a strategy (final, fixed,
    dola, confident, or a plugin) choose the layer whose prediction becomes the next
    token. Start with:

    \b
      layerdecode generate --prompt "What is the capital of France?" --strategy confident
    """
    _state["debug"] = debug


# --------------------------------------------------------------------------- generate


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Generate text with a strategy.")
@model_options
@_strategy_option()
@_param_option
@prompt_options
@_max_tokens_option(None)
@sampling_options
@click.option(
    "--show-layers",
    is_flag=True,
    help="Colour each token by the layer it was decoded from (final layer plain, deeper "
    "layers warmer), with a legend.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (text, prompt_tokens, tokens, layers, entropies, strategy, "
    "speeds, ...) instead of streaming text.",
)
def generate(**kwargs: Any) -> None:
    """Generate text, each token decoded from the layer the strategy picks.

    The text streams to stdout as it is generated; a summary line follows on stderr:
    tokens, tokens/s, the share of tokens decoded from a layer below the final one and
    their mean depth below it. Layers are 0-based (final = number of layers - 1).
    """
    _check_system(kwargs["system"], kwargs["raw"])
    resolved = resolve(kwargs["strategy"], kwargs["params"])
    text = read_prompt(kwargs["prompt"])
    model, tokenizer = load_model(kwargs["model"], kwargs["dtype"])
    prompt = prompt_ids(tokenizer, text, system=kwargs["system"], raw=kwargs["raw"])
    run_generate(
        model,
        tokenizer,
        prompt,
        resolved,
        max_tokens=kwargs["max_tokens"],
        sampling=_sampling(kwargs),
        as_json=kwargs["as_json"],
        show_layers=kwargs["show_layers"],
        model_name=kwargs["model"] or DEFAULT_MODEL_NAME,
    )


def run_generate(
    model, tokenizer, prompt, resolved, *, max_tokens, sampling, as_json, show_layers, model_name
) -> None:
    from rich.console import Console
    from rich.text import Text

    from .generation import ResultCollector, encode_prompt, stream_generate
    from .render import layer_legend, layer_style, summary_line

    out = Console(highlight=False, soft_wrap=True)
    err = _stderr_console()
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt
    ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    collector = ResultCollector(ids, resolved.strategy)
    interrupted = False
    try:
        for response in stream_generate(
            model, tokenizer, ids, strategy=resolved, max_tokens=max_tokens, **sampling
        ):
            collector.add(response)
            if not as_json and response.text:
                if show_layers:
                    style = layer_style(response.layer, response.num_layers)
                    out.print(Text(response.text, style=style), end="")
                else:
                    click.echo(response.text, nl=False)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    if collector.last is None:
        if interrupted:
            raise click.Abort()
        return
    result = collector.result("interrupted" if interrupted else None)
    if as_json:
        data = {"model": model_name, **result.to_dict()}
        if resolved.preset is not None:
            data["strategy"]["preset"] = resolved.preset.name
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        click.echo("")
        if show_layers:
            err.print(layer_legend(result.num_layers, result.layers))
        err.print(summary_line(result, strategy=_label(resolved), interrupted=interrupted))
    if interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


# --------------------------------------------------------------------------- compare


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a JSON-lines file with a ``prompt`` field per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise _usage(f"Cannot read {path}: {e.strerror or e}.") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _usage(f"{path} line {number}: not valid JSON ({e.msg}).") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise _usage(f"{path} line {number}: needs a non-empty string field 'prompt'.")
        prompts.append(prompt)
    if not prompts:
        raise _usage(f"{path} holds no prompts.")
    return prompts


def generate_all(model, tokenizer, prompts, resolved, *, batch_size, max_tokens, sampling, advance):
    """One result per prompt for one strategy; ``advance(n)`` reports finished prompts.

    With ``batch_size > 1`` the prompts go through batched decoding
    (``layerdecode.batch.batch_generate``); otherwise they run one by one.
    """
    if batch_size > 1:
        from .batch import batch_generate

        done = [0]

        def progress(finished: int, total: int) -> None:
            advance(finished - done[0])
            done[0] = finished

        results, _stats = batch_generate(
            model,
            tokenizer,
            prompts,
            strategy=resolved,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            **sampling,
        )
        return results
    from .generation import generate

    results = []
    for prompt in prompts:
        results.append(
            generate(model, tokenizer, prompt, strategy=resolved, max_tokens=max_tokens, **sampling)
        )
        advance(1)
    return results


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Compare strategies side by side.")
@model_options
@click.option(
    "-s",
    "--strategies",
    default="final,confident,dola",
    show_default=True,
    metavar="A,B,...",
    help="Comma-separated strategies, presets or YAML files; the first is the reference "
    "the others are compared with.",
)
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="A prompt (repeatable; '-' reads one from stdin).",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False),
    metavar="FILE.jsonl",
    help="JSON-lines file with a 'prompt' field per line.",
)
@click.option("--system", metavar="TEXT", help="System message for the chat template.")
@click.option("--raw", is_flag=True, help="Send prompts as is, without the chat template.")
@_max_tokens_option(64)
@sampling_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Prompts decoded together in one batch; 1 runs them one by one.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every result.")
def compare(**kwargs: Any) -> None:
    """Run several strategies on the same prompts and show the outputs side by side.

    For each prompt: every strategy's output, the token index where it first diverges from
    the first strategy's, its tokens/s, the share of tokens decoded from a layer below the
    final one and their mean depth. With several prompts, a summary table follows.
    """
    _check_system(kwargs["system"], kwargs["raw"])
    specs = strategy_list(kwargs["strategies"])
    from .config import resolve_strategy

    resolved = [resolve_strategy(spec) for spec in specs]
    texts = [read_prompt(p) for p in kwargs["prompts"]]
    if kwargs["prompts_file"]:
        texts += read_prompts_file(kwargs["prompts_file"])
    if not texts:
        texts = [read_prompt(None)]
    model, tokenizer = load_model(kwargs["model"], kwargs["dtype"])
    prompts = [prompt_ids(tokenizer, t, system=kwargs["system"], raw=kwargs["raw"]) for t in texts]
    labels = _unique_labels([_label(r) for r in resolved])
    sampling = _sampling(kwargs)
    per_strategy = []
    from rich.progress import Progress

    err = _stderr_console()
    total = len(prompts) * len(resolved)
    with Progress(console=err, transient=True, disable=len(prompts) < 2) as progress:
        task = progress.add_task("comparing", total=total)
        for label, strategy in zip(labels, resolved, strict=True):
            progress.update(task, description=label)
            results = generate_all(
                model,
                tokenizer,
                prompts,
                strategy,
                batch_size=kwargs["batch_size"],
                max_tokens=kwargs["max_tokens"],
                sampling=sampling,
                advance=lambda n: progress.advance(task, n),
            )
            per_strategy.append(results)
    per_prompt = [list(row) for row in zip(*per_strategy, strict=True)]
    show_comparison(texts, labels, per_prompt, as_json=kwargs["as_json"])


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def show_comparison(texts, labels, per_prompt, *, as_json: bool) -> None:
    from rich.console import Console

    from .render import compare_summary, compare_table, first_divergence

    if as_json:
        data = {"strategies": labels, "prompts": []}
        for text, results in zip(texts, per_prompt, strict=True):
            runs = []
            for label, result in zip(labels, results, strict=True):
                entry = {"label": label, **result.to_dict()}
                entry["diverges_at"] = first_divergence(results[0].tokens, result.tokens)
                runs.append(entry)
            data["prompts"].append({"prompt": text, "results": runs})
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    out = Console(highlight=False)
    for i, (text, results) in enumerate(zip(texts, per_prompt, strict=True), 1):
        title = f"prompt {i}: {text.strip()}" if len(texts) > 1 else text.strip()
        out.print(compare_table(text, labels, results, title=title[:200]))
    if len(texts) > 1:
        out.print(compare_summary(labels, per_prompt))


# --------------------------------------------------------------------------- inspect


def parse_layers(spec: str) -> Callable[[int], list[int]]:
    """``20:30``, ``-8:``, ``5`` or ``0,10,20:30`` -> a function of the model's depth.

    Ranges are half-open like Python slices; negative numbers count from the end.
    """

    def bad() -> click.UsageError:
        return _usage(
            f"Malformed --layers '{spec}': use START:END (half-open, like 20:30), a layer "
            "number, or a comma-separated mix; negative numbers count from the end."
        )

    items = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                start, _, end = part.partition(":")
                items.append(
                    slice(int(start) if start.strip() else None, int(end) if end.strip() else None)
                )
            else:
                items.append(int(part))
        except ValueError:
            raise bad() from None

    def pick(num_layers: int) -> list[int]:
        from .errors import ConfigError

        chosen: set[int] = set()
        for item in items:
            if isinstance(item, slice):
                chosen.update(range(num_layers)[item])
            else:
                index = item + num_layers if item < 0 else item
                if not 0 <= index < num_layers:
                    raise ConfigError(
                        f"--layers {item} is out of range: the model has {num_layers} layers "
                        f"(0..{num_layers - 1})."
                    )
                chosen.add(index)
        if not chosen:
            raise ConfigError(
                f"--layers '{spec}' selects no layer of this model ({num_layers} layers, "
                f"0..{num_layers - 1})."
            )
        return sorted(chosen)

    return pick


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Logit lens: every layer's prediction.")
@model_options
@_strategy_option()
@_param_option
@prompt_options
@_max_tokens_option(16)
@sampling_options
@click.option(
    "--layers",
    "layers_spec",
    metavar="START:END",
    help="Layers to show: a half-open range like 20:30, a number, or a comma-separated "
    "mix; negative numbers count from the end [default: all].",
)
@click.option(
    "--color",
    type=click.Choice(["entropy", "prob"]),
    default="entropy",
    show_default=True,
    help="What the cell colour shows: the entropy of the layer's distribution or the top-1 "
    "probability.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default="inspect.png",
    show_default=True,
    help="PNG heatmap to write.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the grid as an HTML table.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the grid (top ids, tokens, probabilities, entropies per layer) as JSON.",
)
def inspect(**kwargs: Any) -> None:
    """Show what every layer predicts at every position (the logit lens).

    Generates up to --max-tokens tokens with the chosen strategy, then decodes every layer
    at every position of prompt + output through the final norm and head, and reports the
    top-1 token, its probability and the entropy. The terminal shows a compact grid (final
    layer on top; ● marks the layer the strategy decoded from, ✗ where that layer's top
    token differs from the final layer's) and a table of the generated tokens; the PNG
    heatmap (--out) writes each cell's top token, boxes the chosen layers (red: differs
    from the final layer) and marks the generated positions in blue.
    """
    _check_system(kwargs["system"], kwargs["raw"])
    resolved = resolve(kwargs["strategy"], kwargs["params"])
    pick_layers = parse_layers(kwargs["layers_spec"]) if kwargs["layers_spec"] else None
    text = read_prompt(kwargs["prompt"])
    model, tokenizer = load_model(kwargs["model"], kwargs["dtype"])
    prompt = prompt_ids(tokenizer, text, system=kwargs["system"], raw=kwargs["raw"])

    from rich.console import Console
    from rich.text import Text

    from .adapters import get_adapter
    from .generation import generate
    from .lens import lens_html, logit_lens, plot_lens
    from .render import lens_grid, lens_table

    num_layers = get_adapter(model).num_layers
    layers = pick_layers(num_layers) if pick_layers else None
    result = generate(
        model,
        tokenizer,
        prompt,
        strategy=resolved,
        max_tokens=kwargs["max_tokens"],
        **_sampling(kwargs),
    )
    start = len(result.prompt_tokens) - 1
    chosen = {start + k: layer for k, layer in enumerate(result.layers)}
    lens = logit_lens(
        model,
        tokenizer,
        result.prompt_tokens + result.tokens,
        layers=layers,
        chosen_layers=chosen,
        prompt_length=len(result.prompt_tokens),
    )
    title = f"{kwargs['model'] or DEFAULT_MODEL_NAME} · {_label(resolved)}"
    path = plot_lens(lens, kwargs["out"], color=kwargs["color"], title=title)
    if kwargs["html_path"]:
        page = lens_html(lens, color=kwargs["color"], title=title)
        try:
            with open(kwargs["html_path"], "w", encoding="utf-8") as f:
                f.write(page)
        except OSError as e:
            raise click.FileError(kwargs["html_path"], e.strerror) from None
    if kwargs["as_json"]:
        data = {"model": kwargs["model"] or DEFAULT_MODEL_NAME, "text": result.text}
        data["strategy"] = result.strategy
        data.update(lens.to_dict())
        data["generated_layers"] = result.layers
        data["disagreements"] = [list(d) for d in lens.disagreements()]
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    out = Console(highlight=False)
    out.print(Text.assemble((title, "bold"), f"  output: {result.text!r}"))
    out.print(
        f"layers {lens.layers[0]}..{lens.layers[-1]} of 0..{num_layers - 1} × "
        f"{lens.num_positions} positions · colour: {kwargs['color']} · "
        f"{len(lens.disagreements())} chosen-layer disagreement(s) with the final layer",
        style="dim",
    )
    out.print(lens_grid(lens, color=kwargs["color"]), end="")
    if result.tokens:
        out.print(lens_table(lens))
    err = _stderr_console()
    err.print(f"wrote {path}" + (f" and {kwargs['html_path']}" if kwargs["html_path"] else ""))


# --------------------------------------------------------------------------- strategies


summary_output_options = _stack(
    click.option(
        "--plot",
        type=click.Path(dir_okay=False),
        metavar="FILE.png",
        help="Also draw accuracy with intervals and the chosen-layer histogram per strategy.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
)


@cli.command("eval", context_settings=CONTEXT_SETTINGS, short_help="Score strategies on a task.")
@model_options
@click.option(
    "-t",
    "--task",
    required=True,
    metavar="TASK",
    help="Task recipe: gsm8k, svamp, choice or bbh (prompt template, answer extraction, scoring).",
)
@click.option(
    "-d",
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Data file in the task's format (JSONL; CSV for choice; JSON for bbh).",
)
@click.option(
    "-s",
    "--strategies",
    default="final,confident,dola",
    show_default=True,
    metavar="A,B,...",
    help="Comma-separated strategies, presets or YAML files; the first is the baseline of "
    "the paired comparisons.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most this many items.")
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Items to skip."
)
@click.option(
    "--shots",
    type=click.IntRange(min=0),
    help="Worked examples shown before each question [default: 0, zero-shot].",
)
@click.option(
    "--exemplars",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="File to take the worked examples from [default: the data file, skipping the item].",
)
@click.option(
    "-T",
    "--task-option",
    "task_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Further task option (repeatable): system_prompt, instruction, exemplar_format.",
)
@click.option("--raw", is_flag=True, help="Send prompts as plain text, without the chat template.")
@_max_tokens_option(256)
@sampling_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Prompts decoded together in one batch.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    metavar="FILE.jsonl",
    help="Results file, one record per (item, strategy) [default: eval-TASK-TIME.jsonl].",
)
@click.option(
    "--resume", is_flag=True, help="Continue the results file given with --out where it stopped."
)
@summary_output_options
def eval_command(**kwargs: Any) -> None:
    """Measure strategies on reasoning data: accuracy, paired comparison, layers, loops.

    Every (item, strategy) pair is generated (greedy by default), scored, and appended to the
    results file as soon as it is done; after an interruption, '--resume' continues where
    the run stopped. The summary gives per strategy the accuracy with a 95% Wilson interval,
    the items won and lost against the first strategy with an exact McNemar p-value, tokens/s,
    the share of tokens from a non-final layer and how many generations hit --max-tokens
    (usually a repetition loop).
    """
    import datetime

    if kwargs["resume"] and not kwargs["out"]:
        raise _usage("--resume needs --out: the results file to continue.")
    specs = strategy_list(kwargs["strategies"])
    task_options = parse_params(kwargs["task_options"])
    if kwargs["shots"] is not None:
        task_options["shots"] = kwargs["shots"]
    if kwargs["exemplars"]:
        task_options["exemplars"] = kwargs["exemplars"]
    from .eval.runner import plan_eval, run_eval

    plan = plan_eval(
        model=kwargs["model"] or DEFAULT_MODEL_NAME,
        task=kwargs["task"],
        data=kwargs["data"],
        strategies=specs,
        task_options=task_options,
        offset=kwargs["offset"],
        limit=kwargs["limit"],
        chat=not kwargs["raw"],
        max_tokens=kwargs["max_tokens"],
        **_sampling(kwargs),
    )
    out = kwargs["out"] or (
        f"eval-{kwargs['task']}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    model, tokenizer = load_model(kwargs["model"], kwargs["dtype"])
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    err = _stderr_console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        bar = progress.add_task("eval", total=len(plan.items) * len(plan.strategies))

        def advance(done: int, total: int, strategy: str) -> None:
            progress.update(bar, completed=done, total=total, description=strategy or "eval")

        summary, store = run_eval(
            model,
            tokenizer,
            plan,
            out,
            resume=kwargs["resume"],
            batch_size=kwargs["batch_size"],
            progress=advance,
        )
    from .eval.stats import plot_summary, render_summary

    if store.dropped_bytes:
        err.print(f"recovered {out}: dropped an incomplete last record ({store.dropped_bytes} B)")
    if kwargs["plot"]:
        plot_summary(summary, kwargs["plot"], title=f"{kwargs['task']}: {plan.config.model}")
    if kwargs["as_json"]:
        click.echo(json.dumps({"results": str(out), **summary.to_dict()}, indent=2))
    else:
        from rich.console import Console

        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        console.print(render_summary(summary, title=f"{kwargs['task']} ({out})"))
        err.print(f"results: {out}" + (f"  plot: {kwargs['plot']}" if kwargs["plot"] else ""))


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Summarise an eval results file.")
@click.argument("results", type=click.Path(dir_okay=False), metavar="RESULTS.jsonl")
@click.option(
    "-s",
    "--strategies",
    metavar="A,B,...",
    help="Strategies to summarise, the first as the baseline [default: the run's, in order].",
)
@click.option(
    "--all-items",
    is_flag=True,
    help="Count every record, also of items that not every strategy has answered yet "
    "[default: only items all have answered, so that accuracies are paired].",
)
@click.option(
    "--disagreements",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="List up to this many items that some strategies got right and others wrong.",
)
@summary_output_options
def report(**kwargs: Any) -> None:
    """Summarise a results file written by 'layerdecode eval', without loading the model.

    Works on a finished run and on one still going or stopped (a torn last record is
    skipped). Besides the eval summary it lists the items where the strategies disagree,
    and the time each strategy spent generating.
    """
    from .eval.records import read_results
    from .eval.stats import (
        complete_items,
        disagreements,
        format_duration,
        plot_summary,
        render_disagreements,
        render_summary,
        summarize,
    )

    path = kwargs["results"]
    config, records = read_results(path)
    names = config.strategy_names
    if kwargs["strategies"]:
        names = strategy_list(kwargs["strategies"])
        unknown = [n for n in names if n not in config.strategy_names]
        if unknown:
            raise _usage(
                f"--strategies: {path} has no strategy {', '.join(map(repr, unknown))}; "
                f"it holds {', '.join(config.strategy_names)}."
            )
    left_out: list[str] = []
    if not kwargs["all_items"]:
        records, left_out = complete_items(records, names)
    summary = summarize(records, names)
    disagreeing = disagreements(records, names)
    scope = "every record" if kwargs["all_items"] else "items every strategy answered"
    title = f"{config.task} · {config.model} · {summary.n_items} {scope}"
    if kwargs["plot"]:
        plot_summary(summary, kwargs["plot"], title=title)
    if kwargs["as_json"]:
        data = {
            "results": str(path),
            "config": config.model_dump(mode="json"),
            "items_left_out": left_out,
            **summary.to_dict(),
            "disagreements": [asdict(d) for d in disagreeing],
        }
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(render_summary(summary, title=title))
    console.print(f"time generating: {format_duration(summary.busy_seconds)}")
    if left_out:
        console.print(
            f"left out {len(left_out)} items that only some strategies answered "
            "(--all-items counts them)"
        )
    if kwargs["disagreements"] and len(names) > 1:
        console.print(render_disagreements(disagreeing, names, limit=kwargs["disagreements"]))
    if kwargs["plot"]:
        _stderr_console().print(f"plot: {kwargs['plot']}")


@cli.group(context_settings=CONTEXT_SETTINGS, short_help="List, show and validate strategies.")
def strategies() -> None:
    """List, describe and validate strategies and YAML presets."""


@strategies.command("list", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def strategies_list(as_json: bool) -> None:
    """List the strategies (built-in and plugins) and the shipped presets, with their source."""
    from .config import list_presets, shipped_presets
    from .registry import get_strategy_class, list_strategies, strategy_registry

    registry = strategy_registry()
    rows = []
    for name in list_strategies():
        cls = get_strategy_class(name)
        source = registry.source(name)
        kind = "built-in" if source.startswith("layerdecode.") else "plugin"
        rows.append(
            {
                "name": name,
                "kind": kind,
                "strategy": name,
                "description": cls.description,
                "source": source,
            }
        )
    files = shipped_presets()
    for preset in list_presets():
        rows.append(
            {
                "name": preset.name,
                "kind": "preset",
                "strategy": preset.strategy,
                "description": preset.description,
                "source": str(files.get(preset.name, "")),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    from rich.console import Console

    from .render import records_table

    columns = ("name", "kind", "strategy", "description", "source")
    table = records_table(rows, columns, title="strategies and presets", no_wrap=("name", "kind"))
    Console(highlight=False).print(table)


def _type_name(annotation: Any) -> str:
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _params_schema(cls) -> list[dict[str, Any]]:
    from pydantic_core import PydanticUndefined

    rows = []
    for name, field in cls.Params.model_fields.items():
        default = field.default
        if default is PydanticUndefined:
            default = "(required)" if field.default_factory is None else field.default_factory()
        rows.append(
            {
                "name": name,
                "type": _type_name(field.annotation),
                "default": default,
                "description": field.description or "",
            }
        )
    return rows


@strategies.command("show", context_settings=CONTEXT_SETTINGS)
@click.argument("name", metavar="NAME|PRESET|FILE.yaml")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def strategies_show(name: str, as_json: bool) -> None:
    """Describe a strategy or preset: its params with types, defaults and descriptions.

    For a preset (or a YAML preset file) the values it sets are shown beside the defaults,
    with its generation defaults.
    """
    from .config import read_preset, shipped_presets
    from .config import resolve_strategy as _resolve
    from .registry import get_strategy_class, list_strategies, strategy_registry

    presets = shipped_presets()
    preset = None
    if name in presets:
        preset = read_preset(presets[name])
    elif name not in list_strategies():
        preset = _resolve(name).preset  # raises the did-you-mean error for unknown names
    strategy_name = preset.strategy if preset is not None else name
    cls = get_strategy_class(strategy_name)
    schema = _params_schema(cls)
    data: dict[str, Any] = {
        "name": name,
        "strategy": strategy_name,
        "description": cls.description,
        "source": strategy_registry().source(strategy_name),
        "params": schema,
    }
    if preset is not None:
        data["preset"] = {
            "name": preset.name,
            "description": preset.description,
            "params": preset.params,
            "generation": preset.generation.model_dump(exclude_none=True),
        }
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str))
        return
    from rich.console import Console
    from rich.text import Text

    from .render import records_table

    out = Console(highlight=False)
    if preset is not None:
        out.print(Text.assemble((preset.name, "bold"), ": preset of strategy ", strategy_name))
        if preset.description:
            out.print(Text(preset.description))
        gen = data["preset"]["generation"]
        if gen:
            out.print("generation defaults: " + ", ".join(f"{k}={v}" for k, v in gen.items()))
        out.print("")
    out.print(Text.assemble((strategy_name, "bold"), f" — {cls.description}"))
    out.print(Text(f"source: {data['source']}", style="dim"))
    if not schema:
        out.print("no params")
        return
    rows = []
    for row in schema:
        shown = {**row, "param": row["name"], "default": repr(row["default"])}
        if preset is not None:
            shown["preset"] = (
                repr(preset.params[row["name"]]) if row["name"] in preset.params else ""
            )
        rows.append(shown)
    columns = ["param", "type", "default"] + (["preset"] if preset is not None else [])
    out.print(records_table(rows, [*columns, "description"], title="params", no_wrap=("param",)))


@strategies.command("validate", context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=True, metavar="FILE.yaml...")
def strategies_validate(files: tuple[str, ...]) -> None:
    """Check YAML preset files: schema, strategy name and param types.

    Prints one line per file; exits with status 2 when any file is invalid.
    """
    from .config import read_preset
    from .errors import ConfigError

    bad = 0
    for path in files:
        try:
            preset = read_preset(path)
        except ConfigError as e:
            bad += 1
            _say_error(str(e))
            continue
        click.echo(f"ok: {path} (preset '{preset.name}', strategy '{preset.strategy}')")
    if bad:
        raise click.exceptions.Exit(2)


# --------------------------------------------------------------------------- models


@cli.group(context_settings=CONTEXT_SETTINGS, short_help="List, pull and describe models.")
def models() -> None:
    """List, download and describe the models layerdecode knows by name."""


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    if isinstance(obj, str):
        return {"name": obj}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


@models.command("list", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models_list(as_json: bool) -> None:
    """List the named models (manifests) and whether each is downloaded."""
    from . import manifests

    rows = [_as_dict(m) for m in manifests.list_manifests()]
    for row in rows:
        try:
            row["cached"] = bool(manifests.model_info(row["name"]).get("cached"))
        except Exception:  # a broken cache entry must not hide the list
            row["cached"] = False
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, default=str))
        return
    from rich.console import Console

    from .render import records_table

    for row in rows:
        sources = row.get("sources")
        if isinstance(sources, list):
            row["sources"] = ", ".join(
                str(s.get("kind", "?")) if isinstance(s, dict) else str(s) for s in sources
            )
    # Licence and sources are long: "models info NAME" shows them.
    preferred = ("name", "architecture", "cached", "description")
    columns = [c for c in preferred if any(c in row for row in rows)] or ["name"]
    Console(highlight=False).print(
        records_table(
            rows, columns, title="models", no_wrap=("name", "architecture", "cached", "sources")
        )
    )


@models.command("pull", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.option("--dtype", metavar="DTYPE", help="Store the weights in this dtype.")
@click.option("--force", is_flag=True, help="Download again even if already cached.")
def models_pull(name: str, dtype: str | None, force: bool) -> None:
    """Download a named model into the cache (see 'layerdecode models list')."""
    from .manifests import pull

    err = _stderr_console()
    if err.is_terminal:
        with err.status(f"pulling {name}") as status:
            path = pull(
                name, dtype=dtype, force=force, progress=lambda msg: status.update(str(msg))
            )
    else:
        path = pull(name, dtype=dtype, force=force, progress=lambda msg: err.print(str(msg)))
    click.echo(f"{name}: {path}")


@models.command("info", context_settings=CONTEXT_SETTINGS)
@click.argument("name", metavar="NAME|PATH")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def models_info(name: str, as_json: bool) -> None:
    """Show what is known about a model: manifest, architecture, layers, cache path."""
    from .manifests import model_info

    info = _as_dict(model_info(name))
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, default=str))
        return
    from rich.console import Console

    from .render import key_value_table

    Console(highlight=False).print(key_value_table(info, title=name))


def main() -> None:  # pragma: no cover - python -m layerdecode.cli
    cli(prog_name=os.path.basename(sys.argv[0]) or "layerdecode")


if __name__ == "__main__":  # pragma: no cover
    main()
