"""``lm-eval``: lm-evaluation-harness's own command line, with the ``layerdecode`` model.

lm-eval finds models by registration at import time, so this command imports
``layerdecode.harness`` and hands every argument to lm-eval's entry point unchanged (see
docs/lm-eval.md). Under ``mlx.launch`` every rank runs lm-eval, the model shares the
requests out, and only rank 0 keeps the results: it alone writes and prints them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

INSTALL_HINT = 'lm-eval is not installed: pip install "layerdecode[lm-eval]"'
_SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's ``argv`` for ``args``: ``run`` when no subcommand is named, and
    ``--model layerdecode`` when a run names no model."""
    args = list(args)
    if args in ([], ["-h"], ["--help"]):
        return ["lm-eval", "run", "--help"]
    if args[0] not in _SUBCOMMANDS:
        args = ["run", *args]
    if args[0] == "run" and not any(
        a in ("--model", "-M") or a.startswith("--model=") for a in args
    ):
        args = ["run", "--model", "layerdecode", *args[1:]]
    return ["lm-eval", *args]


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="Run lm-evaluation-harness tasks with any strategy.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args: tuple[str, ...]) -> None:
    """Run lm-evaluation-harness with the ``layerdecode`` model; every lm-eval flag works.

    \b
      layerdecode lm-eval --model_args model=smollm2-135m-instruct,strategy=confident \\
          --tasks gsm8k --limit 20

    The model is ``layerdecode`` unless --model names another. Strategy params go into
    --model_args (lists as 16:18:20). --help shows lm-eval's own flags.
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        import layerdecode.harness  # noqa: F401  (registers the model with lm-eval)
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise click.ClickException(INSTALL_HINT) from None
    argv = lm_eval_argv(list(args))
    if argv[-1] == "--help":
        click.echo("layerdecode lm-eval: lm-eval's command line with the 'layerdecode' model.\n")
    from layerdecode.distributed import init

    group = init()  # the model itself refuses a split model, on rank 0 alone
    saved = sys.argv
    sys.argv = argv
    try:
        with group.running(), _results_on_rank_zero(group.is_main):
            cli_evaluate()
    finally:
        sys.argv = saved


@contextmanager
def _results_on_rank_zero(is_main: bool) -> Iterator[None]:
    """On ranks other than 0, lm-eval's evaluation returns None, as it does for those ranks
    under its own launchers, so its command line writes, prints and uploads nothing there."""
    if is_main:
        yield
        return
    from lm_eval import evaluator

    evaluate = evaluator.simple_evaluate

    def evaluate_silently(*args: Any, **kwargs: Any) -> None:
        evaluate(*args, **kwargs)

    evaluator.simple_evaluate = evaluate_silently
    try:
        yield
    finally:
        evaluator.simple_evaluate = evaluate
