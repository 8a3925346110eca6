"""The ``tokenopt`` command line."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    help="tokenopt: learn per-query token budgets and decoding modes for LLMs.",
    no_args_is_help=True,
    add_completion=False,
)
demo_lm_app = typer.Typer(help="Build and check the embedded demo LM.", no_args_is_help=True)
app.add_typer(demo_lm_app, name="demo-lm")

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@app.command()
def collect(
    out: Annotated[Path, typer.Option(help="Output folder for the outcome table.")] = Path("runs/collect"),
    data: Annotated[
        Path | None,
        typer.Option(help="Question file, JSONL: {id, question, answers[, split]} per line. Default: the demo suite."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Local causal-LM folder (or hub id). Default: the embedded demo LM.")
    ] = None,
    budgets: Annotated[str, typer.Option(help="Reasoning budgets, increasing, comma-separated.")] = "0,4,8,16,32",
    modes: Annotated[str, typer.Option(help="Decoding modes: greedy, beam<k>, sc<k>.")] = "greedy,sc5,beam3",
    prompt_template: Annotated[str, typer.Option(help="Prompt template with a {question} placeholder.")] = "{question}",
    answer_cue: Annotated[str, typer.Option(help="Cue appended when the budget runs out (budget forcing).")] = "=",
    answer_regex: Annotated[
        str | None, typer.Option(help="Regex extracting the answer after the cue (first group). Default: whole line.")
    ] = None,
    max_answer_tokens: Annotated[int, typer.Option(help="Most tokens an answer may have.")] = 8,
    chat_template: Annotated[bool, typer.Option(help="Wrap prompts in the tokenizer's chat template.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of sc<k>.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on cpu, bfloat16 on cuda), float32, float16, bfloat16.")] = (
        "auto"
    ),
    batch_size: Annotated[int, typer.Option(help="Queries decoded together.")] = 32,
    shard_size: Annotated[int, typer.Option(help="Queries per shard file (the unit of resumption).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the split hash and of sampling.")] = 0,
    strict: Annotated[bool, typer.Option(help="Fail on a prompt too long for the context (default: skip it).")] = False,
    split: Annotated[list[str] | None, typer.Option(help="Collect only this split (repeatable). Default: all.")] = None,
) -> None:
    """Run every (budget, mode) action on every query and write the outcome table.

    The LM reasons once per (query, mode) at the largest budget; the forced answer
    at each smaller budget branches off the cached prefix. An interrupted run
    resumes where it stopped when run again with the same --out.
    """
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect

    try:
        config = CollectConfig(
            out=str(out),
            data=str(data) if data is not None else None,
            model=model,
            budgets=_split_list(budgets, int, "--budgets"),
            modes=_split_list(modes, str, "--modes"),
            prompt_template=prompt_template,
            answer_cue=answer_cue,
            answer_regex=answer_regex,
            max_answer_tokens=max_answer_tokens,
            use_chat_template=chat_template,
            temperature=temperature,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            shard_size=shard_size,
            seed=seed,
            strict=strict,
            splits=list(split) if split else None,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(" ".join(["tokenopt", *sys.argv[1:]]) + "\n", encoding="utf-8")
        with _progress() as progress:
            task = progress.add_task("collect", total=None)

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            summary = run_collect(config, progress=report)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    if summary.skipped:
        console.print(f"[yellow]warning:[/yellow] skipped {len(summary.skipped)} queries longer than the context")
    console.print(
        f"wrote {summary.rows} rows for {summary.queries} queries to {summary.out} "
        f"({summary.shards_written} shards written, {summary.shards_reused} reused) in {summary.seconds:.1f} s"
    )


def _split_list(text: str, kind: type, option: str) -> list[Any]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [kind(part) for part in parts]
    except ValueError:
        raise ValueError(f"{option} {text!r}: every item must be {kind.__name__}") from None


@demo_lm_app.command("build")
def demo_lm_build(
    out: Annotated[Path, typer.Option(help="Folder for the trained LM (save_pretrained format).")],
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and the initial weights.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    check: Annotated[bool, typer.Option(help="Collect the test split and print the property table.")] = True,
) -> None:
    """Train the demo LM deterministically, save it, and measure its property table."""
    from tokenopt.demo.train import DemoTrainConfig, train_demo_lm

    config = DemoTrainConfig(steps=steps, seed=seed, threads=threads)
    with _progress() as progress:
        task = progress.add_task("train demo LM", total=steps)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"train demo LM (loss {loss:.3f})")

        summary = train_demo_lm(out, config, progress=report)
    console.print(f"trained {summary['parameters']:,} parameters in {summary['seconds']:.0f} s")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if check:
        _check_demo(out, out / "properties", out)


def _check_demo(model_dir: Path, table_dir: Path, report_dir: Path) -> None:
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect
    from tokenopt.demo.properties import check_properties, property_table

    if table_dir.exists():
        shutil.rmtree(table_dir)
    with _progress() as progress:
        task = progress.add_task("collect test split", total=None)
        run_collect(
            CollectConfig(out=str(table_dir), model=str(model_dir), splits=["test"]),
            progress=lambda done, total: progress.update(task, completed=done, total=total),
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


@demo_lm_app.command("check")
def demo_lm_check(
    model: Annotated[Path | None, typer.Option(help="LM folder to check. Default: the embedded demo LM.")] = None,
    work_dir: Annotated[Path, typer.Option(help="Scratch folder for the outcome table.")] = Path("runs/demo-check"),
) -> None:
    """Collect the demo test split with an LM and print its property table."""
    from tokenopt.lm.backend import DEMO_MODEL_DIR

    _check_demo(model or DEMO_MODEL_DIR, work_dir / "table", work_dir)


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value (e.g. --set ent_coef=0.02)")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@app.command()
def train(
    table: Annotated[Path, typer.Option(help="Outcome-table folder written by `tokenopt collect`.")],
    out: Annotated[Path, typer.Option(help="Run folder (config.yml, command.txt, tb/, checkpoints/, policy/).")] = Path(
        "runs/train"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML of PPO hyperparameters keyed by env id. Default: agents/configs/ppo.yml.")
    ] = None,
    env: Annotated[
        str, typer.Option(help="budget (TokenBudget-v0, one query per episode) or stream (TokenBudgetStream-v0).")
    ] = "budget",
    algo: Annotated[str, typer.Option(help="ppo, or maskable_ppo (sb3-contrib).")] = "ppo",
    total_timesteps: Annotated[
        int | None, typer.Option(help="Environment steps. Default: n_timesteps from the YAML.")
    ] = None,
    cost_weight: Annotated[float, typer.Option(help="lambda in EM - lambda * tokens (start value if constrained).")] = (
        0.01
    ),
    em_floor: Annotated[
        float | None,
        typer.Option(help="Adapt lambda so validation EM is at most this many points below max-budget greedy."),
    ] = None,
    token_target: Annotated[
        float | None, typer.Option(help="Adapt lambda so validation mean billed tokens are at most this.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of environments, network and PPO.")] = 0,
    eval_freq: Annotated[int, typer.Option(help="Environment steps between validations.")] = 4096,
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping early.")] = 6,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Hyperparameter override key=value (repeatable).")
    ] = None,
    export: Annotated[bool, typer.Option(help="Export the best model as RUN/policy/ when done.")] = True,
) -> None:
    """Train a PPO agent on an outcome table, validate it, and export the best policy."""
    from tokenopt.agents.pipeline import export_run
    from tokenopt.agents.train import CONFIG_DIR, TrainConfig
    from tokenopt.agents.train import train as run_train

    try:
        settings = TrainConfig(
            table=str(table),
            out=str(out),
            env=env,
            algo=algo,
            config_file=str(config or CONFIG_DIR / "ppo.yml"),
            hyperparams=_parse_overrides(set_ or []),
            total_timesteps=total_timesteps,
            seed=seed,
            cost_weight=cost_weight,
            em_floor=em_floor,
            token_target=token_target,
            eval_freq=eval_freq,
            patience=patience,
        )
        with _progress() as progress:
            task = progress.add_task("train", total=None)

            def report(steps: int, _: int, metrics: dict[str, float]) -> None:
                progress.update(
                    task,
                    completed=steps,
                    description=f"train (val reward {metrics['reward']:.3f}, gap {metrics['gap_recovered']:.2f})",
                )

            result = run_train(settings, progress=report)
        if export:
            export_run(out)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    best = result.best_metrics
    console.print(
        f"trained {result.timesteps} steps in {result.seconds:.0f} s; best validation: EM {best.get('em', 0):.3f}, "
        f"tokens {best.get('tokens', 0):.2f}, reward {best.get('reward', 0):.3f}, "
        f"gap recovered {best.get('gap_recovered', 0):.2f}; TensorBoard logs in {out / 'tb'}"
    )


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `tokenopt train`.")],
    onnx: Annotated[bool, typer.Option(help="Also write policy.onnx (logits only).")] = False,
) -> None:
    """Export a run's best model as a pickle-free runtime policy (RUN/policy/)."""
    from tokenopt.agents.pipeline import export_run

    try:
        path = export_run(run, onnx=onnx)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    typer.echo(str(path))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's table and run.")] = Path("runs/demo"),
    total_timesteps: Annotated[int | None, typer.Option(help="PPO steps. Default: from the YAML.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of training.")] = 0,
) -> None:
    """Collect the demo (reusing a cached table), train, export and evaluate on the test split."""
    from tokenopt.agents.pipeline import evaluate_policy, export_run, format_table, save_report
    from tokenopt.agents.train import TrainConfig
    from tokenopt.agents.train import train as run_train
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect

    table = out / "table"
    run = out / "run"
    with _progress() as progress:
        task = progress.add_task("collect demo table", total=None)
        run_collect(CollectConfig(out=str(table)), progress=lambda d, t: progress.update(task, completed=d, total=t))
        task = progress.add_task("train PPO", total=None)
        run_train(
            TrainConfig(table=str(table), out=str(run), seed=seed, total_timesteps=total_timesteps),
            progress=lambda steps, _, m: progress.update(
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


if __name__ == "__main__":  # pragma: no cover
    app()
