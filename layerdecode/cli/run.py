"""``generate``, ``compare`` and ``inspect``: run strategies on prompts and show the result."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from .console import (
    EXIT_INTERRUPTED,
    echo_json,
    load_model,
    read_prompt,
    read_prompts_file,
    stderr_console,
    stdout_console,
)
from .options import (
    CONTEXT_SETTINGS,
    batch_size_option,
    chat_template_option,
    check_system,
    chosen_options,
    file_option,
    generation_options,
    json_option,
    model_options,
    param_option,
    prompt_options,
    resolve,
    strategies_option,
    strategy_list,
    strategy_option,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from layerdecode.config import ResolvedStrategy
    from layerdecode.distributed import ProcessGroup
    from layerdecode.generation import GenerationResult
    from layerdecode.options import GenerationOptions
    from layerdecode.trace import TraceWriter


def trace_option(what: str) -> Callable[[Callable], Callable]:
    """``--trace DIR``: one Parquet row per generated token (needs pyarrow)."""
    return click.option(
        "--trace",
        type=click.Path(file_okay=False),
        metavar="DIR",
        help=f"Write a Parquet trace into this directory: one row per generated token {what}, "
        "with its chosen layer, changed flag, head rows and the entropy of every layer read; "
        "written as the run goes (needs the 'trace' extra; see docs/traces.md).",
    )


def open_trace(path: str, tokenizer: Any, *, resume: bool = False) -> TraceWriter:
    """A trace writer whose rows carry each token's text."""
    from layerdecode.trace import TraceWriter

    return TraceWriter(path, decode=lambda token: tokenizer.decode([token]), resume=resume)


@click.command(
    "generate", context_settings=CONTEXT_SETTINGS, short_help="Generate text with a strategy."
)
@model_options
@strategy_option()
@param_option
@prompt_options
@generation_options(max_tokens=None)
@click.option(
    "--show-layers",
    is_flag=True,
    help="Colour each token by the layer it was decoded from (final layer plain, deeper "
    "layers warmer), with a legend (one for the reasoning and one for the answer of a "
    "thinking model).",
)
@json_option(
    "Print one JSON object (text, reasoning, prompt_tokens, tokens, layers, parts, "
    "entropies, changed, head_rows, strategy, speeds, ...) instead of streaming text."
)
@trace_option("of the generation")
def generate_command(**kwargs: Any) -> None:
    """Generate text, each token decoded from the layer the strategy picks.

    The text streams to stdout as it is generated (a thinking model's reasoning dimmed,
    before its answer); a summary line follows on stderr: tokens, tokens/s, the share of
    tokens decoded from a layer below the final one and their mean depth below it, the
    share of tokens that differ from the final layer's and the vocabulary-head rows spent
    per token beyond the final layer's. --show-layers adds the histogram of depths below
    the final layer (and a paper's published figures for its strategy). Layers are 0-based
    (final = number of layers - 1). Generation options left unset take the preset's
    defaults.
    """
    from layerdecode.distributed import init
    from layerdecode.loading import DEFAULT_MODEL

    check_system(kwargs["system"], kwargs["raw"], kwargs["chat_template_kwargs"])
    resolved = resolve(kwargs["strategy"], kwargs["params"])
    options = chosen_options(kwargs)
    text = read_prompt(kwargs["prompt"])
    if kwargs["trace"]:
        from layerdecode.trace import TraceWriter

        TraceWriter.check(kwargs["trace"])
    group = init("tensor")
    with group.running():
        model, tokenizer = load_for(kwargs, group)
        prompt = prompt_of(tokenizer, text, kwargs)
        trace = None
        if kwargs["trace"] and group.is_main:
            trace = open_trace(kwargs["trace"], tokenizer)
        with group.watch("generating"):
            run_generate(
                model,
                tokenizer,
                prompt,
                resolved,
                options,
                as_json=kwargs["as_json"],
                show_layers=kwargs["show_layers"],
                model_name=kwargs["model"] or DEFAULT_MODEL,
                on_token=group.beat,
                trace=trace,
            )


def prompt_of(tokenizer: Any, text: str, kwargs: dict[str, Any]) -> list[int]:
    """The prompt ids of ``text`` under the command's --system, --raw and template options."""
    from layerdecode.prompts import build_prompt

    return build_prompt(
        tokenizer,
        text,
        system=kwargs["system"],
        chat=not kwargs["raw"],
        chat_template_kwargs=kwargs["chat_template_kwargs"],
    )


def load_for(kwargs: dict[str, Any], group: ProcessGroup) -> tuple[Any, Any]:
    """The model of ``--model``/``--dtype``: this rank's slice under a tensor group."""
    if not group.tensor:
        return load_model(kwargs["model"], kwargs["dtype"])
    from layerdecode.loading import load

    return load(kwargs["model"], dtype=kwargs["dtype"], group=group)


def run_generate(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    resolved: ResolvedStrategy,
    options: GenerationOptions,
    *,
    as_json: bool,
    show_layers: bool,
    model_name: str,
    on_token: Callable[[], None] | None = None,
    trace: TraceWriter | None = None,
) -> None:
    """Stream one generation to stdout; Ctrl-C keeps what was generated and exits 130.

    ``on_token`` is called after every token (the distributed watchdog's heartbeat);
    ``trace`` gets a row per token of the output and is closed at the end."""
    from layerdecode.generation import ResultCollector, stream_generate
    from layerdecode.render import part_legends, streamed_text, summary_line
    from layerdecode.render_stats import token_lines

    out = stdout_console(soft_wrap=True)
    collector = ResultCollector(prompt, resolved)
    interrupted = False
    reasoned = answered = False
    position = 0
    try:
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            strategy=resolved,
            options=options,
            candidates=trace is not None,
        ):
            collector.add(response)
            if trace is not None and response.in_output:
                trace.add_event("0", resolved.label, position, response)
                position += 1
            if on_token is not None:
                on_token()
            if as_json or not (response.text or response.reasoning):
                continue
            separate = reasoned and not answered and bool(response.text)
            out.print(streamed_text(response, show_layers=show_layers, separate=separate), end="")
            sys.stdout.flush()
            reasoned = reasoned or bool(response.reasoning)
            answered = answered or bool(response.text)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if trace is not None:
            trace.close()
    if collector.last is None:
        if interrupted:
            raise click.Abort()
        return
    result = collector.result("interrupted" if interrupted else None)
    if as_json:
        echo_json({"model": model_name, **result.to_dict()})
    else:
        click.echo("")
        err = stderr_console()
        if show_layers:
            for legend in part_legends(result):
                err.print(legend)
            for line in token_lines(result.token_stats(), resolved.strategy.name):
                err.print(line)
        err.print(summary_line(result, strategy=resolved.label, interrupted=interrupted))
    if interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


@click.command(
    "compare", context_settings=CONTEXT_SETTINGS, short_help="Compare strategies side by side."
)
@model_options
@strategies_option("the reference the others are compared with")
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="A prompt (repeatable; '-' reads one from stdin).",
)
@file_option(
    "--prompts",
    "prompts_file",
    metavar="FILE.jsonl",
    help="JSON-lines file with a 'prompt' field per line.",
)
@click.option("--system", metavar="TEXT", help="System message for the chat template.")
@click.option("--raw", is_flag=True, help="Send prompts as is, without the chat template.")
@chat_template_option
@generation_options(max_tokens=64)
@batch_size_option(1, "Prompts decoded together in one batch; 1 runs them one by one.")
@json_option("Print one JSON object with every result.")
def compare_command(**kwargs: Any) -> None:
    """Run several strategies on the same prompts and show the outputs side by side.

    For each prompt: every strategy's output (a thinking model's reasoning dimmed, before
    its answer), the token index where it first diverges from the first strategy's, its
    tokens/s, the share of tokens decoded from a layer below the final one and their mean
    depth. With several prompts, a summary table follows. Generation options left unset
    take each preset's defaults.
    """
    from rich.progress import Progress

    from layerdecode.batch import batch_generate
    from layerdecode.config import resolve_strategy
    from layerdecode.distributed import init

    check_system(kwargs["system"], kwargs["raw"], kwargs["chat_template_kwargs"])
    resolved = [resolve_strategy(spec) for spec in strategy_list(kwargs["strategies"])]
    options = chosen_options(kwargs)
    texts = [read_prompt(p) for p in kwargs["prompts"]]
    if kwargs["prompts_file"]:
        texts += read_prompts_file(kwargs["prompts_file"])
    if not texts:
        texts = [read_prompt(None)]
    group = init("tensor")
    with group.running():
        model, tokenizer = load_for(kwargs, group)
        prompts = [prompt_of(tokenizer, t, kwargs) for t in texts]
        labels = unique_labels([r.label for r in resolved])
        per_strategy = []
        quiet = len(prompts) < 2 or not group.is_main
        with (
            Progress(console=stderr_console(), transient=True, disable=quiet) as bar,
            group.watch("comparing"),
        ):
            task = bar.add_task("comparing", total=len(prompts) * len(resolved))
            for i, (label, strategy) in enumerate(zip(labels, resolved, strict=True)):
                bar.update(task, description=label)

                def advance(done: int, _total: int, base: int = i * len(prompts)) -> None:
                    group.beat()
                    bar.update(task, completed=base + done)

                results, _stats = batch_generate(
                    model,
                    tokenizer,
                    prompts,
                    strategy=strategy,
                    options=options,
                    batch_size=kwargs["batch_size"],
                    progress=advance,
                )
                per_strategy.append(results)
        per_prompt = [list(row) for row in zip(*per_strategy, strict=True)]
        show_comparison(texts, labels, per_prompt, as_json=kwargs["as_json"])


def unique_labels(labels: list[str]) -> list[str]:
    """The labels, with ``#2``, ``#3`` added to repeats so that columns stay apart."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def show_comparison(
    texts: list[str],
    labels: list[str],
    per_prompt: list[list[GenerationResult]],
    *,
    as_json: bool,
) -> None:
    from layerdecode.render import compare_summary, compare_table, first_divergence

    if as_json:
        data: dict[str, Any] = {"strategies": labels, "prompts": []}
        for text, results in zip(texts, per_prompt, strict=True):
            runs = []
            for label, result in zip(labels, results, strict=True):
                entry = {"label": label, **result.to_dict()}
                entry["diverges_at"] = first_divergence(results[0].tokens, result.tokens)
                runs.append(entry)
            data["prompts"].append({"prompt": text, "results": runs})
        echo_json(data)
        return
    out = stdout_console()
    for i, (text, results) in enumerate(zip(texts, per_prompt, strict=True), 1):
        title = f"prompt {i}: {text.strip()}" if len(texts) > 1 else text.strip()
        out.print(compare_table(text, labels, results, title=title[:200]))
    if len(texts) > 1:
        out.print(compare_summary(labels, per_prompt))


@click.command(
    "inspect", context_settings=CONTEXT_SETTINGS, short_help="Logit lens: every layer's prediction."
)
@model_options
@strategy_option()
@param_option
@prompt_options
@generation_options(max_tokens=16)
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
@json_option("Print the grid (top ids, tokens, probabilities, entropies per layer) as JSON.")
def inspect_command(**kwargs: Any) -> None:
    """Show what every layer predicts at every position (the logit lens).

    Generates up to --max-tokens tokens with the chosen strategy, then decodes every layer
    at every position of prompt + output through the final norm and head, and reports the
    top-1 token, its probability and the entropy. The terminal shows a compact grid (final
    layer on top; ● marks the layer the strategy decoded from, ✗ where that layer's top
    token differs from the final layer's) and a table of the generated tokens; the PNG
    heatmap (--out) writes each cell's top token, boxes the chosen layers (red: differs
    from the final layer) and marks the generated positions in blue.
    """
    from rich.text import Text

    from layerdecode.distributed import refuse_launched
    from layerdecode.generation import generate
    from layerdecode.lens import inspect_generation, parse_layer_spec
    from layerdecode.loading import DEFAULT_MODEL
    from layerdecode.plots import lens_html, plot_lens
    from layerdecode.render import lens_grid, lens_table

    refuse_launched("inspect")
    check_system(kwargs["system"], kwargs["raw"], kwargs["chat_template_kwargs"])
    resolved = resolve(kwargs["strategy"], kwargs["params"])
    options = chosen_options(kwargs)
    layers = parse_layer_spec(kwargs["layers_spec"]) if kwargs["layers_spec"] else None
    text = read_prompt(kwargs["prompt"])
    model, tokenizer = load_model(kwargs["model"], kwargs["dtype"])
    prompt = prompt_of(tokenizer, text, kwargs)
    result = generate(model, tokenizer, prompt, strategy=resolved, options=options)
    lens = inspect_generation(model, tokenizer, result, layers=layers)

    color, html_path = kwargs["color"], kwargs["html_path"]
    model_name = kwargs["model"] or DEFAULT_MODEL
    title = f"{model_name} · {resolved.label}"
    path = plot_lens(lens, kwargs["out"], color=color, title=title)
    if html_path:
        try:
            with open(html_path, "w", encoding="utf-8") as f:
                f.write(lens_html(lens, color=color, title=title))
        except OSError as e:
            raise click.FileError(html_path, e.strerror) from None
    if kwargs["as_json"]:
        data = {"model": model_name, "text": result.text, "strategy": result.strategy}
        data.update(lens.to_dict())
        data["generated_layers"] = result.layers
        data["disagreements"] = [list(d) for d in lens.disagreements()]
        echo_json(data)
        return
    out = stdout_console()
    out.print(Text.assemble((title, "bold"), f"  output: {result.text!r}"))
    out.print(
        f"layers {lens.layers[0]}..{lens.layers[-1]} of 0..{lens.num_layers - 1} × "
        f"{lens.num_positions} positions · colour: {color} · "
        f"{len(lens.disagreements())} chosen-layer disagreement(s) with the final layer",
        style="dim",
    )
    out.print(lens_grid(lens, color=color), end="")
    if result.tokens:
        out.print(lens_table(lens))
    stderr_console().print(f"wrote {path}" + (f" and {html_path}" if html_path else ""))
