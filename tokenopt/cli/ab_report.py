"""``tokenopt ab-report``: arms A and B of a decision log (or of several replicas' logs) compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenopt.cli.common import fail

__all__ = ["ab_report_command"]


def ab_report_command(
    log: Annotated[
        list[Path],
        typer.Argument(
            help="Decision log the server writes with --log; several replicas' logs (files, folders, quoted glob "
            "patterns such as 'logs/*.sqlite') are read together, feedback joined across them.",
            show_default=False,
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of Markdown.")] = False,
    alpha: Annotated[float, typer.Option(help="Significance level of both two-sided tests, in (0, 1).")] = 0.05,
) -> None:
    """Compare arms A and B of a decision log: EM (z-test on feedback) and billed tokens (Welch's t-test).

    Give several logs (one per replica) to report on them together: a request id found in
    two logs counts once, and feedback that reached another replica is joined to its request.
    """
    from tokenopt.agents.evaluation.ab_test import ab_report, format_ab_report

    try:
        report = ab_report(log, alpha)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_output else format_ab_report(report))
