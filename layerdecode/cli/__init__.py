"""The ``layerdecode`` command line: one thin module per command group, over the public API.

``run`` (generate, compare, inspect), ``evaluate`` (eval, report) and ``catalog``
(strategies, models) hold the commands; this module holds the group and its error policy.
Heavy imports (mlx, the model loaders, matplotlib) happen inside the commands, so
``layerdecode --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import __version__
from .catalog import models, strategies
from .console import EXIT_INTERRUPTED, say_error
from .evaluate import eval_command, report_command
from .harness import lm_eval_command
from .options import CONTEXT_SETTINGS
from .run import compare_command, generate_command, inspect_command
from .serve import serve_command

__all__ = ["cli", "main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2

_state = {"debug": False}


class LayerdecodeGroup(click.Group):
    """A group that turns every failure into one line on stderr and a meaningful exit code.

    Usage problems (bad options, bad strategy config) exit 2, runtime failures exit 1,
    Ctrl-C exits 130. ``--debug`` prints the traceback as well.
    """

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from layerdecode.errors import ConfigError, LayerdecodeError

        _state["debug"] = False
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            self._fail(e.format_message() + hint, EXIT_USAGE)
        except click.ClickException as e:
            self._fail(e.format_message(), e.exit_code)
        except click.Abort:
            click.echo("", err=True)
            self._fail("interrupted", EXIT_INTERRUPTED)
        except ConfigError as e:
            self._fail(str(e), EXIT_USAGE)
        except LayerdecodeError as e:
            self._fail(str(e), EXIT_FAILURE)
        except Exception as e:  # the last line of defence: one line, not a traceback
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            hint = "" if _state["debug"] else " (run with --debug for the traceback)"
            self._fail(detail + hint, EXIT_FAILURE)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def _fail(self, message: str, code: int) -> None:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        say_error(message)
        sys.exit(code)


@click.group(cls=LayerdecodeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="layerdecode")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Say on stderr which BLAS MLX's CPU matrix products use (Linux).",
)
def cli(debug: bool, verbose: bool) -> None:
    """Decode each token from the decoder layer a pluggable strategy picks.

    layerdecode runs mlx-lm models and, at every step, lets a strategy (final, fixed,
    dola, confident, sled, or a plugin) choose the layer whose prediction becomes the next
    token. Start with:

    \b
      layerdecode generate --prompt "What is the capital of France?" --strategy confident
    """
    _state["debug"] = debug
    if verbose:
        from layerdecode.blas import blas_status

        click.echo(f"blas: {blas_status()}", err=True)


for _command in (
    generate_command,
    compare_command,
    inspect_command,
    eval_command,
    report_command,
    strategies,
    models,
    serve_command,
    lm_eval_command,
):
    cli.add_command(_command)


def main() -> None:
    """``python -m layerdecode.cli``: the same command line as the installed script."""
    cli(prog_name=os.path.basename(sys.argv[0]) or "layerdecode")
