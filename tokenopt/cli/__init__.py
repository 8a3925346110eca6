"""The ``tokenopt`` command line: one module per command, options generated from the config dataclasses.

Each command lives in its own module (``collect.py``, ``train.py``, ...); :mod:`tokenopt.cli.common`
holds what they share, including :func:`~tokenopt.cli.common.config_options`, which declares a
command's options once, from the config dataclass the command fills.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from tokenopt.cli.ab_report import ab_report_command
from tokenopt.cli.collect import add_features_command, collect_command
from tokenopt.cli.cv import cv_command
from tokenopt.cli.demo import demo_command, demo_lm_build, demo_lm_check
from tokenopt.cli.eval import eval_command
from tokenopt.cli.export import export_command
from tokenopt.cli.gate import gate_command
from tokenopt.cli.serve import serve_command
from tokenopt.cli.train import train_command
from tokenopt.cli.tune import tune_command

__all__ = ["COMMANDS", "app", "main"]

app = typer.Typer(
    help="tokenopt: learn per-query token budgets and decoding modes for LLMs.",
    no_args_is_help=True,
    add_completion=False,
)
demo_lm_app = typer.Typer(help="Build and check the embedded demo LM.", no_args_is_help=True)
app.add_typer(demo_lm_app, name="demo-lm")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    """Set the log level of every command."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def _register(group: typer.Typer, name: str, command: Callable[..., Any]) -> None:
    # Typer renders help as rich markup: escaped, "tokenopt[serve]" keeps its "[serve]".
    group.command(name, help=escape(inspect.getdoc(command) or ""))(command)


COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("collect", collect_command),
    ("add-features", add_features_command),
    ("train", train_command),
    ("export", export_command),
    ("eval", eval_command),
    ("demo", demo_command),
    ("gate", gate_command),
    ("cv", cv_command),
    ("tune", tune_command),
    ("ab-report", ab_report_command),
    ("serve", serve_command),
]
"""The commands of ``tokenopt``, by name, in the order ``tokenopt --help`` lists them."""
for _name, _command in COMMANDS:
    _register(app, _name, _command)
_register(demo_lm_app, "build", demo_lm_build)
_register(demo_lm_app, "check", demo_lm_check)
