"""``tokenopt export``: a run's best model as the pickle-free runtime policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenopt.cli.common import fail

__all__ = ["export_command"]


def export_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `tokenopt train`.")],
    onnx: Annotated[bool, typer.Option(help="Also write policy.onnx (logits only).")] = False,
) -> None:
    """Export a run's best model as a pickle-free runtime policy (RUN/policy/)."""
    from tokenopt.agents.export import export_run

    try:
        path = export_run(run, onnx=onnx)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    typer.echo(str(path))
