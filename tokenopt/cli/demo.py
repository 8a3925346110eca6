"""``tokenopt demo`` (the whole job on the embedded demo) and ``tokenopt demo-lm build|check``."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenopt.cli.common import ConfigOptions, config_options, console, progress
from tokenopt.cli.train import TRAIN_CONFIG

__all__ = ["DEMO_LM_OPTIONS", "DEMO_TRAIN_OPTIONS", "demo_command", "demo_lm_build", "demo_lm_check"]

DEMO_TRAIN_OPTIONS = ConfigOptions(TRAIN_CONFIG, fields=("total_timesteps", "seed"))

DEMO_LM_OPTIONS = ConfigOptions("tokenopt.demo.train:DemoTrainConfig", fields=("steps", "seed", "threads"))


@config_options(settings=DEMO_TRAIN_OPTIONS)
def demo_command(
    *,
    out: Annotated[Path, typer.Option(help="Folder for the demo's table and run.")] = Path("runs/demo"),
    settings: dict[str, Any],
) -> None:
    """Collect the demo (reusing a cached table), train, export and evaluate on the test split."""
    from tokenopt.agents.common.evaluation import evaluate_policy
    from tokenopt.agents.evaluation.report import format_table, save_report
    from tokenopt.agents.export import export_run
    from tokenopt.agents.ppo.train import TrainConfig
    from tokenopt.agents.ppo.train import train as run_train
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect

    table = out / "table"
    run = out / "run"
    with progress() as bars:
        task = bars.add_task("collect demo table", total=None)
        run_collect(CollectConfig(out=str(table)), progress=lambda d, t: bars.update(task, completed=d, total=t))
        task = bars.add_task("train PPO", total=None)
        run_train(
            TrainConfig(table=str(table), out=str(run), **settings),
            progress=lambda steps, _, m: bars.update(
                task, completed=steps, description=f"train PPO (val gap {m['gap_recovered']:.2f})"
            ),
        )
    policy_dir = export_run(run)
    rows, extra = evaluate_policy(policy_dir, table, "test")
    save_report(run / "report.json", rows, extra)
    max_greedy = max(
        (name for name in (r.method[6:] for r in rows if r.method.startswith("fixed ")) if name.endswith("/greedy")),
        key=lambda n: int(n.split("/")[0][1:]),
    )
    report = format_table(rows, max_greedy)
    (run / "report.md").write_text(report + "\n", encoding="utf-8")
    typer.echo(f"Test split, {extra['queries']} queries, lambda 0.01 per billed token:\n")
    typer.echo(report)
    typer.echo(f"\nTensorBoard: tensorboard --logdir {run / 'tb'}\nPolicy: {policy_dir}")


@config_options(settings=DEMO_LM_OPTIONS)
def demo_lm_build(
    *,
    out: Annotated[Path, typer.Option(help="Folder for the trained LM (save_pretrained format).")],
    settings: dict[str, Any],
    check: Annotated[bool, typer.Option(help="Collect the test split and print the property table.")] = True,
) -> None:
    """Train the demo LM deterministically, save it, and measure its property table."""
    from tokenopt.demo.train import DemoTrainConfig, train_demo_lm

    config = DemoTrainConfig(**settings)
    with progress() as bars:
        task = bars.add_task("train demo LM", total=config.steps)

        def report(step: int, total: int, loss: float) -> None:
            bars.update(task, completed=step, description=f"train demo LM (loss {loss:.3f})")

        summary = train_demo_lm(out, config, progress=report)
    console.print(f"trained {summary['parameters']:,} parameters in {summary['seconds']:.0f} s")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if check:
        _check_demo(out, out / "properties", out)


def demo_lm_check(
    model: Annotated[Path | None, typer.Option(help="LM folder to check. Default: the embedded demo LM.")] = None,
    work_dir: Annotated[Path, typer.Option(help="Scratch folder for the outcome table.")] = Path("runs/demo-check"),
) -> None:
    """Collect the demo test split with an LM and print its property table."""
    from tokenopt.demo import DEMO_MODEL_DIR

    _check_demo(model or DEMO_MODEL_DIR, work_dir / "table", work_dir)


def _check_demo(model_dir: Path, table_dir: Path, report_dir: Path) -> None:
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect
    from tokenopt.demo.properties import check_properties, property_table

    if table_dir.exists():
        shutil.rmtree(table_dir)
    with progress() as bars:
        task = bars.add_task("collect test split", total=None)
        run_collect(
            CollectConfig(out=str(table_dir), model=str(model_dir), splits=["test"]),
            progress=lambda done, total: bars.update(task, completed=done, total=total),
        )
    checks = check_properties(table_dir)
    lines = ["# Demo LM properties (test split)", "", property_table(table_dir), "## Checks", ""]
    lines += [f"- [{'x' if c.passed else ' '}] {c.name}: {c.value:.3f} (bar {c.threshold}); {c.detail}" for c in checks]
    report = "\n".join(lines) + "\n"
    (report_dir / "PROPERTIES.md").write_text(report, encoding="utf-8")
    (report_dir / "properties.json").write_text(
        json.dumps([asdict(c) for c in checks], indent=2) + "\n", encoding="utf-8"
    )
    typer.echo(report)
    if not all(c.passed for c in checks):
        console.print("[yellow]warning:[/yellow] some demo properties are not met (see the checks above)")
