"""``eval`` and ``report``: score strategies on a task, and summarise a results file."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from .console import echo_json, stderr_console, stdout_console, usage
from .options import (
    CONTEXT_SETTINGS,
    batch_size_option,
    chat_template_option,
    check_system,
    chosen_options,
    file_option,
    generation_options,
    model_options,
    parse_params,
    strategies_option,
    strategy_list,
    summary_output_options,
)
from .run import load_for, open_trace, trace_option

if TYPE_CHECKING:
    from layerdecode.distributed import ProcessGroup
    from layerdecode.eval.records import RunConfig
    from layerdecode.eval.runner import EvalPlan
    from layerdecode.eval.stats import Summary


@click.command("eval", context_settings=CONTEXT_SETTINGS, short_help="Score strategies on a task.")
@model_options
@click.option(
    "-t",
    "--task",
    required=True,
    metavar="TASK",
    help="Task recipe: gsm8k, svamp, choice or bbh (prompt template, answer extraction, scoring).",
)
@file_option(
    "-d",
    "--data",
    required=True,
    metavar="FILE",
    help="Data file in the task's format (JSONL; CSV for choice; JSON for bbh).",
)
@strategies_option("the baseline of the paired comparisons")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most this many items.")
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Items to skip."
)
@click.option(
    "--shots",
    type=click.IntRange(min=0),
    help="Worked examples shown before each question [default: 0, zero-shot].",
)
@file_option(
    "--exemplars",
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
@chat_template_option
@generation_options(max_tokens=256)
@batch_size_option(8, "Prompts decoded together in one batch.")
@file_option(
    "-o",
    "--out",
    metavar="FILE.jsonl",
    help="Results file, one record per (item, strategy) [default: eval-TASK-TIME.jsonl].",
)
@click.option(
    "--resume", is_flag=True, help="Continue the results file given with --out where it stopped."
)
@click.option(
    "--distributed",
    metavar="data|tensor",
    envvar="LAYERDECODE_DISTRIBUTED",
    show_envvar=True,
    help="Under mlx.launch: 'data' gives each rank the whole model and a share of the "
    "items; 'tensor' splits the model across the ranks, which decode in lockstep. Rank 0 "
    "writes the results either way (see docs/distributed.md). [default: data]",
)
@trace_option("of every (item, strategy) pair run now (--resume adds to it)")
@summary_output_options
def eval_command(**kwargs: Any) -> None:
    """Measure strategies on reasoning data: accuracy, paired comparison, layers, loops.

    Every (item, strategy) pair is generated (greedy by default), scored, and appended to the
    results file as soon as it is done; after an interruption, '--resume' continues where
    the run stopped. The summary gives per strategy the accuracy with a 95% Wilson interval,
    the items won and lost against the first strategy with an exact McNemar p-value, tokens/s,
    the share of tokens from a non-final layer and how many generations hit --max-tokens
    (usually a repetition loop). Per-token figures follow: the share of tokens that differ
    from the final layer's, the extra vocabulary-head rows per token and the histogram of
    chosen depths below the final layer; and the accuracy per level when the data has a
    'level' or 'difficulty' field.
    """
    import datetime

    from layerdecode.distributed import init
    from layerdecode.eval.runner import plan_eval
    from layerdecode.loading import DEFAULT_MODEL

    if kwargs["resume"] and not kwargs["out"]:
        raise usage("--resume needs --out: the results file to continue.")
    if kwargs["trace"]:
        from layerdecode.trace import TraceWriter

        TraceWriter.check(kwargs["trace"], resume=kwargs["resume"])
    check_system(None, kwargs["raw"], kwargs["chat_template_kwargs"])
    task_options = parse_params(kwargs["task_options"])
    if kwargs["shots"] is not None:
        task_options["shots"] = kwargs["shots"]
    if kwargs["exemplars"]:
        task_options["exemplars"] = kwargs["exemplars"]
    plan = plan_eval(
        model=kwargs["model"] or DEFAULT_MODEL,
        task=kwargs["task"],
        data=kwargs["data"],
        strategies=strategy_list(kwargs["strategies"]),
        task_options=task_options,
        offset=kwargs["offset"],
        limit=kwargs["limit"],
        chat=not kwargs["raw"],
        chat_template_kwargs=kwargs["chat_template_kwargs"],
        options=chosen_options(kwargs),
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = kwargs["out"] or f"eval-{kwargs['task']}-{stamp}.jsonl"
    group = init(kwargs["distributed"])
    with group.running():
        _run(kwargs, plan, out, group)


def _run(kwargs: dict[str, Any], plan: EvalPlan, out: str, group: ProcessGroup) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from layerdecode.eval.runner import run_eval
    from layerdecode.eval.stats import by_difficulty
    from layerdecode.plots import plot_summary
    from layerdecode.render import render_summary

    model, tokenizer = load_for(kwargs, group)
    err = stderr_console()
    trace = None
    if kwargs["trace"] and group.is_main:
        trace = open_trace(kwargs["trace"], tokenizer, resume=kwargs["resume"])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not group.is_main) as progress:
        bar = progress.add_task("eval", total=len(plan.items) * len(plan.strategies))

        def advance(done: int, total: int, strategy: str) -> None:
            progress.update(bar, completed=done, total=total, description=strategy or "eval")

        try:
            summary, store = run_eval(
                model,
                tokenizer,
                plan,
                out,
                resume=kwargs["resume"],
                batch_size=kwargs["batch_size"],
                progress=advance,
                group=group,
                trace=trace,
            )
        finally:
            if trace is not None:
                trace.close()
    if summary is None or store is None:  # a rank other than 0: rank 0 reports
        return
    if store.dropped_bytes:
        err.print(f"recovered {out}: dropped an incomplete last record ({store.dropped_bytes} B)")
    if kwargs["plot"]:
        plot_summary(summary, kwargs["plot"], title=f"{kwargs['task']}: {plan.config.model}")
    names = plan.config.strategy_names
    levels = by_difficulty(store.records, names)
    if kwargs["as_json"]:
        data = {"results": str(out), **summary.to_dict()}
        echo_json({**data, **token_json(plan.config, levels)}, indent=2)
        return
    console = stdout_console(wide=True)
    console.print(render_summary(summary, title=f"{kwargs['task']} ({out})"))
    print_token_figures(console, summary, plan.config, levels)
    err.print(
        f"results: {out}"
        + (f"  plot: {kwargs['plot']}" if kwargs["plot"] else "")
        + (f"  trace: {kwargs['trace']}" if trace is not None else "")
    )


def strategy_kinds(config: RunConfig) -> dict[str, str]:
    """Each strategy's name in the results -> its registered strategy (``confident``...)."""
    return {s.name: str(s.params.get("strategy", s.name)) for s in config.strategies}


def token_json(config: RunConfig, levels: dict[str, Summary]) -> dict[str, Any]:
    """The published figures beside the run's strategies, and the accuracy per level."""
    from layerdecode.layerstats import PUBLISHED

    kinds = strategy_kinds(config)
    published = {k: asdict(PUBLISHED[k]) for k in dict.fromkeys(kinds.values()) if k in PUBLISHED}
    return {
        "published": published,
        "difficulty": {level: summary.to_dict() for level, summary in levels.items()},
    }


def print_token_figures(
    console: Any, summary: Summary, config: RunConfig, levels: dict[str, Summary]
) -> None:
    """The per-token table, the depth histogram and, when the data has levels, accuracy
    per level."""
    from layerdecode.render_stats import depth_table, difficulty_table, token_table

    rows = [(s.name, s.token_stats()) for s in summary.strategies]
    console.print(token_table(rows, strategy_kinds(config)))
    console.print(depth_table(rows))
    if levels:
        console.print(difficulty_table(levels))


@click.command(
    "report", context_settings=CONTEXT_SETTINGS, short_help="Summarise an eval results file."
)
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
def report_command(**kwargs: Any) -> None:
    """Summarise a results file written by 'layerdecode eval', without loading the model.

    Works on a finished run and on one still going or stopped (a torn last record is
    skipped). Besides the eval summary it shows the per-token figures (non-final and
    changed shares, extra vocabulary-head rows per token, the depth histogram) beside the
    published ones for strategies that have them, the accuracy per level when the data has
    a 'level' or 'difficulty' field, the items where the strategies disagree, and the time
    each strategy spent generating; for a thinking model, the layers of the reasoning's
    tokens and of the answer's apart.
    """
    from layerdecode.eval.records import read_results
    from layerdecode.eval.stats import (
        by_difficulty,
        complete_items,
        disagreements,
        part_summaries,
        summarize,
    )
    from layerdecode.plots import plot_summary
    from layerdecode.render import (
        format_duration,
        render_disagreements,
        render_parts,
        render_summary,
    )

    path = kwargs["results"]
    config, records = read_results(path)
    names = config.strategy_names
    if kwargs["strategies"]:
        names = strategy_list(kwargs["strategies"])
        unknown = [n for n in names if n not in config.strategy_names]
        if unknown:
            raise usage(
                f"--strategies: {path} has no strategy {', '.join(map(repr, unknown))}; "
                f"it holds {', '.join(config.strategy_names)}."
            )
    left_out: list[str] = []
    if not kwargs["all_items"]:
        records, left_out = complete_items(records, names)
    summary = summarize(records, names)
    parts = part_summaries(records, names)
    disagreeing = disagreements(records, names)
    levels = by_difficulty(records, names)
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
            "parts": [asdict(p) for p in parts],
            "disagreements": [asdict(d) for d in disagreeing],
            **token_json(config, levels),
        }
        echo_json(data, indent=2)
        return
    console = stdout_console(wide=True)
    console.print(render_summary(summary, title=title))
    print_token_figures(console, summary, config, levels)
    if parts:
        console.print(render_parts(parts))
    console.print(f"time generating: {format_duration(summary.busy_seconds)}")
    if left_out:
        console.print(
            f"left out {len(left_out)} items that only some strategies answered "
            "(--all-items counts them)"
        )
    if kwargs["disagreements"] and len(names) > 1:
        console.print(render_disagreements(disagreeing, names, limit=kwargs["disagreements"]))
    if kwargs["plot"]:
        stderr_console().print(f"plot: {kwargs['plot']}")
