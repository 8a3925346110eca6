"""``tokenopt eval``: the scoreboard against fixed budgets, the published methods and the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tokenopt.cli.common import ConfigOptions, Flag, config_options, console, fail

__all__ = ["SCOREBOARD_OPTIONS", "eval_command"]

SCOREBOARD_OPTIONS = ConfigOptions(
    "tokenopt.agents.evaluation.scoreboard:ScoreboardConfig",
    fields=(
        "policy",
        "table",
        "split",
        "out",
        "cost_weights",
        "total_timesteps",
        "seed",
        "sweep_dir",
        "probe_run",
        "conditioned",
        "stream_run",
        "stream_passes",
    ),
    flags={
        "policy": Flag(argument=True, help="Run folder (with policy/) or exported policy folder."),
        "split": Flag(help="Split to report (baselines fit on train, chosen on val)."),
        "out": Flag(help="Folder for report.md, report.json, PNG plots and tb/."),
        "seed": Flag(help="Seed of the baselines' classifiers."),
    },
    paths=("policy", "table", "out", "sweep_dir", "probe_run", "conditioned", "stream_run"),
)


@config_options(settings=SCOREBOARD_OPTIONS)
def eval_command(*, settings: dict[str, Any]) -> None:
    """Score the policy against fixed budgets, TALE, Dynasor, DEER, Adaptive-Consistency, RouteLLM, CLEAR, oracle."""
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, run_scoreboard

    try:
        config = ScoreboardConfig(**settings)
        report = run_scoreboard(config, progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    from tokenopt.agents.evaluation.scoreboard import format_weight_table

    bar = report["bar"]
    default = next(w for w in report["per_weight"] if w["cost_weight"] == report["default_cost_weight"])
    lines = [f"{method}: left out, {reason}" for method, reason in report["left_out"].items()]
    lines += [
        f"\nCost weight {default['cost_weight']:g}, {report['queries']} {report['split']} queries; each figure with "
        "its 95% bootstrap interval over the queries (the last column paired):\n",
        *format_weight_table(default),
        "",
        f"policy on or above every baseline's curve for {bar['weights_on_or_above']} of {bar['weights']} cost weights; "
        f"gap recovered at the default weight {bar['gap_recovered_at_default']:.2f}",
    ]
    if "probe_weights_on_or_above_rules" in bar:
        lines.append(
            f"probe controller on or above the Dynasor- and DEER-style curves for "
            f"{bar['probe_weights_on_or_above_rules']} of {bar['weights']} cost weights, higher reward than both for "
            f"{bar['probe_weights_beating_rules']}; gap recovered at the default weight "
            f"{bar['probe_gap_recovered_at_default']:.2f}"
        )
    if "stream" in report:
        from tokenopt.agents.evaluation.scoreboard import format_stream_section

        lines += ["", *format_stream_section(report["stream"])[2:]]
    typer.echo("\n".join([*lines, f"report: {Path(config.out) / 'report.md'}"]))
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
