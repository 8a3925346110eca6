"""``tokenopt export``: a run's best model as the pickle-free runtime policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenopt.cli.common import console, fail

__all__ = ["export_command"]


def export_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `tokenopt train`.")],
    onnx: Annotated[bool, typer.Option(help="Also write policy.onnx (logits only).")] = False,
    fallback: Annotated[
        bool,
        typer.Option(
            help="Do no harm, as `tokenopt train` does: a policy that does not beat the best fixed action on val "
            "beyond the noise is exported as that action (the learned one goes to RUN/policy-learned/)."
        ),
    ] = True,
) -> None:
    """Export a run's best model as a pickle-free runtime policy (RUN/policy/)."""
    from tokenopt.agents.evaluation.no_harm import apply_no_harm, format_no_harm
    from tokenopt.agents.export import export_run

    try:
        path = export_run(run, onnx=onnx)
        no_harm = apply_no_harm(run, fallback=fallback)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    if no_harm is not None:
        console.print(format_no_harm(no_harm), highlight=False, markup=False)
    typer.echo(str(path))
