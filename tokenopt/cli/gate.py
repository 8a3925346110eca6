"""``tokenopt gate``: the deployment gate, NEW against OLD on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tokenopt.cli.common import REQUIRED, ConfigOptions, Flag, config_options, fail

__all__ = ["GATE_OPTIONS", "gate_command"]

GATE_OPTIONS = ConfigOptions(
    "tokenopt.agents.evaluation.gate:GateConfig",
    fields=(
        "table",
        "split",
        "cost_weight",
        "max_em_drop",
        "reward_margin",
        "confidence",
        "resamples",
        "seed",
        "beat_fixed",
    ),
    flags={"table": Flag(default=REQUIRED)},
    paths=("table",),
)


@config_options(settings=GATE_OPTIONS)
def gate_command(
    *,
    new: Annotated[Path, typer.Argument(help="Candidate policy folder (policy.json + policy.npz).")],
    old: Annotated[Path, typer.Argument(help="Deployed policy folder to compare against.")],
    settings: dict[str, Any],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
) -> None:
    """Deployment gate: exit 0 if NEW is not worse than OLD on a split, 1 if it is, 2 on bad input."""
    from tokenopt.agents.evaluation.gate import GateConfig, format_gate, run_gate, save_gate

    try:
        result = run_gate(new, old, GateConfig(**settings))
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    typer.echo(format_gate(result))
    if json_path is not None:
        save_gate(json_path, result)
    raise typer.Exit(code=0 if result.passed else 1)
