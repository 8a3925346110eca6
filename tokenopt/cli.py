"""The ``tokenopt`` command line."""

from __future__ import annotations

import json
import logging
import os
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
    upstream: Annotated[
        str | None,
        typer.Option(help="Collect from this OpenAI-compatible server (vLLM, TGI, llama.cpp) instead of --model."),
    ] = None,
    upstream_model: Annotated[
        str | None, typer.Option(help="Model name sent to --upstream. Default: the first of its /v1/models.")
    ] = None,
    upstream_api_key: Annotated[
        str | None, typer.Option(envvar="TOKENOPT_UPSTREAM_API_KEY", help="Bearer token for --upstream.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once against --upstream.")] = 16,
    ray: Annotated[
        bool,
        typer.Option(
            help="Spread the shards over Ray workers: --ray starts Ray here, --ray ADDRESS joins a cluster. "
            "Needs pip install 'tokenopt[ray]'."
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        # Typer has no option with an optional value, so --ray is a flag and the address an argument after it.
        typer.Argument(help="With --ray: host:port, ray://host:port, auto, or local (the default)."),
    ] = None,
    ray_workers: Annotated[int, typer.Option(help="Ray workers with --ray, each loading the model once.")] = 2,
    cpus_per_worker: Annotated[
        float, typer.Option(help="CPUs each Ray worker reserves (fractional leaves Ray's own tasks a CPU).")
    ] = 0.5,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs each Ray worker reserves (it decodes there).")] = 0.0,
) -> None:
    """Run every (budget, mode) action on every query and write the outcome table.

    The LM reasons once per (query, mode) at the largest budget; the forced answer
    at each smaller budget branches off the cached prefix. An interrupted run
    resumes where it stopped when run again with the same --out.
    """
    from tokenopt.collect import CollectConfig
    from tokenopt.collect import collect as run_collect
    from tokenopt.lm.upstream import UpstreamError

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
            upstream=upstream,
            upstream_model=upstream_model,
            upstream_api_key=upstream_api_key,
            concurrency=concurrency,
        )
        out.mkdir(parents=True, exist_ok=True)
        argv = list(sys.argv[1:])
        for index, word in enumerate(argv):  # command.txt must not hold the upstream's key
            if word.startswith("--upstream-api-key="):
                argv[index] = "--upstream-api-key=***"
            elif index > 0 and sys.argv[index] == "--upstream-api-key":
                argv[index] = "***"
        (out / "command.txt").write_text(" ".join(["tokenopt", *argv]) + "\n", encoding="utf-8")
        with _progress() as progress:
            task = progress.add_task("collect", total=None)

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            if ray_address is not None and not ray:
                raise ValueError(f"unexpected argument {ray_address!r}: a Ray address follows --ray")
            if ray:
                from tokenopt.collect.ray import RayConfig, collect_ray

                ray_config = RayConfig(ray_address, ray_workers, cpus_per_worker, gpus_per_worker)
                summary = collect_ray(config, ray_config, progress=report)
            else:
                summary = run_collect(config, progress=report)
    except (ValueError, FileNotFoundError, UpstreamError, ImportError) as error:
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
    from tokenopt.demo import DEMO_MODEL_DIR

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
    table: Annotated[
        Path | None, typer.Option(help="Outcome-table folder written by `tokenopt collect` (not with --from-log).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder (config.yml, command.txt, tb/, checkpoints/, policy/).")] = Path(
        "runs/train"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML of PPO hyperparameters keyed by env id. Default: agents/configs/ppo.yml.")
    ] = None,
    env: Annotated[
        str, typer.Option(help="budget (TokenBudget-v0), stream (TokenBudgetStream-v0) or probe (TokenBudgetProbe-v0).")
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
    seeds: Annotated[
        int, typer.Option(help="Train this many runs, with seeds SEED, SEED+1, ..., into OUT/seed-<s>/.")
    ] = 1,
    ensemble: Annotated[
        bool,
        typer.Option(help="With --seeds N>1: also export one policy averaging the runs (OUT/policy/) and compare."),
    ] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Warm start from a run folder or an exported policy folder.")
    ] = None,
    init_lr_scale: Annotated[
        float, typer.Option(help="With --init-from: the hidden layers' learning rate relative to the heads'.")
    ] = 0.3,
    from_log: Annotated[
        Path | None,
        typer.Option(help="Refine the --init-from policy off-policy on this decision log's feedback (no table)."),
    ] = None,
    arm: Annotated[str, typer.Option(help="With --from-log: the A/B arm whose rows are used.")] = "A",
    epochs: Annotated[int | None, typer.Option(help="With --from-log: passes over the logged rows (30).")] = None,
    clip: Annotated[
        float | None, typer.Option(help="With --from-log: PPO clip range of the importance ratio (0.2).")
    ] = None,
) -> None:
    """Train a PPO agent on an outcome table, validate it, and export the best policy.

    With --seeds N, train N runs into OUT/seed-<s>/ and compare their policies on the
    test split; --ensemble adds one policy averaging them (OUT/policy/, OUT/ensemble.json).
    With --from-log LOG --init-from POLICY, refine an exported policy on a server's
    decision log instead (clipped importance-weighted policy gradient; OUT/from_log.json).
    """
    from dataclasses import replace

    if from_log is not None:
        given = {"--table": table is not None, "--env": env != "budget", "--algo": algo != "ppo",
                 "--config": config is not None, "--total-timesteps": total_timesteps is not None,
                 "--em-floor": em_floor is not None, "--token-target": token_target is not None,
                 "--seeds": seeds != 1, "--ensemble": ensemble}  # fmt: skip
        _train_from_log(
            from_log, init_from, out, cost_weight, arm, epochs, clip, seed, set_ or [],
            [option for option, used in given.items() if used],
        )  # fmt: skip
        return
    only_from_log = {"--arm": arm != "A", "--epochs": epochs is not None, "--clip": clip is not None}
    if any(only_from_log.values()) or table is None:
        used = [option for option, value in only_from_log.items() if value]
        _fail(
            ValueError(f"{used} apply only with --from-log LOG")
            if used
            else ValueError(
                "give --table (the outcome table to train on), or --from-log LOG --init-from POLICY_DIR "
                "(refine a policy on a server's decision log)"
            )
        )
        return

    from tokenopt.agents.export import export_ensemble, export_run, format_seed_report, seed_report
    from tokenopt.agents.ppo.train import CONFIG_DIR, TrainConfig, TrainResult
    from tokenopt.agents.ppo.train import train as run_train
    from tokenopt.cost import CostModel

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
            init_from=str(init_from) if init_from is not None else None,
            init_lr_scale=init_lr_scale,
        )
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        if ensemble and seeds < 2:
            raise ValueError(f"--ensemble averages several runs: give --seeds 2 or more (got --seeds {seeds})")
        runs = [(seed, out)] if seeds == 1 else [(seed + k, out / f"seed-{seed + k}") for k in range(seeds)]
        results: list[TrainResult] = []
        with _progress() as progress:
            for run_seed, run_dir in runs:
                name = "train" if seeds == 1 else f"train seed {run_seed}"
                task = progress.add_task(name, total=None)

                def report(steps: int, _: int, metrics: dict[str, float], task: Any = task, name: str = name) -> None:
                    progress.update(
                        task,
                        completed=steps,
                        description=f"{name} (val reward {metrics['reward']:.3f}, gap {metrics['gap_recovered']:.2f})",
                    )

                results.append(run_train(replace(settings, seed=run_seed, out=str(run_dir)), progress=report))
        if export or ensemble:
            for _, run_dir in runs:
                export_run(run_dir)
        if ensemble:
            export_ensemble([run_dir for _, run_dir in runs], out / "policy")
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    for (run_seed, run_dir), result in zip(runs, results, strict=True):
        best = result.best_metrics
        console.print(
            f"{'' if seeds == 1 else f'seed {run_seed}: '}trained {result.timesteps} steps in {result.seconds:.0f} s; "
            f"best validation: EM {best.get('em', 0):.3f}, tokens {best.get('tokens', 0):.2f}, "
            f"reward {best.get('reward', 0):.3f}, gap recovered {best.get('gap_recovered', 0):.2f}; "
            f"TensorBoard logs in {run_dir / 'tb'}"
        )
    if seeds > 1 and (export or ensemble):
        try:
            comparison = seed_report(
                {f"seed {run_seed}": run_dir / "policy" for run_seed, run_dir in runs},
                table,
                CostModel(cost_weight),
                ensemble=out / "policy" if ensemble else None,
            )
        except ValueError as error:
            _fail(error)
            return
        report_path = out / ("ensemble.json" if ensemble else "seeds.json")
        report_path.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"Test split, {comparison['queries']} queries, lambda {cost_weight:g} per billed token:\n")
        typer.echo(format_seed_report(comparison))
        if ensemble:
            best_single = max(comparison["singles"], key=lambda entry: entry["reward"])
            verdict = "beats" if comparison["ensemble"]["reward"] > best_single["reward"] else "does not beat"
            typer.echo(
                f"\nThe ensemble ({out / 'policy'}) {verdict} the best single policy ({best_single['policy']}) "
                f"on test reward: {comparison['ensemble']['reward']:.4f} vs {best_single['reward']:.4f} "
                f"(mean of singles {comparison['mean_single']['reward']:.4f})."
            )
        typer.echo(f"Report: {report_path}")


def _train_from_log(
    log: Path,
    init_from: Path | None,
    out: Path,
    cost_weight: float,
    arm: str,
    epochs: int | None,
    clip: float | None,
    seed: int,
    overrides: list[str],
    conflicting: list[str],
) -> None:
    """``tokenopt train --from-log``: refine an exported policy on a decision log and report the held-out figures."""
    from tokenopt.agents.from_log import FromLogConfig, refine_from_log

    try:
        if conflicting:
            raise ValueError(
                f"--from-log refines an exported policy on a decision log; {conflicting} train PPO on an outcome "
                "table and do not apply"
            )
        if init_from is None:
            raise ValueError("--from-log needs the policy to refine: --init-from POLICY_DIR (an exported policy)")
        settings = FromLogConfig(log=str(log), init_from=str(init_from), out=str(out), arm=arm,
                                 cost_weight=cost_weight, seed=seed)  # fmt: skip
        explicit = {"epochs": epochs, "clip": clip}
        settings = settings.with_overrides(
            _parse_overrides(overrides) | {key: value for key, value in explicit.items() if value is not None}
        )
        result = refine_from_log(settings)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    (out / "command.txt").write_text(" ".join(["tokenopt", *sys.argv[1:]]) + "\n", encoding="utf-8")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")

    def figures(values: dict[str, Any]) -> str:
        if values["reward"] is None:
            return "no held-out row matches its choices"
        return (
            f"reward {values['reward']:.3f}, EM {values['em']:.3f}, billed tokens {values['billed_tokens']:.2f} "
            f"({values['matched_rows']} matching rows, effective {values['effective_rows']:.0f})"
        )

    gain = f"new - old: {result.verdict}"
    if result.holdout_gain is not None and result.holdout_gain_interval is not None:
        low, high = result.holdout_gain_interval
        gain += f" ({result.holdout_gain:+.3f} reward, 95% interval [{low:+.3f}, {high:+.3f}])"
    typer.echo(
        f"refined {result.init_policy_id!r} on {result.rows['train']} logged rows of arm {arm} "
        f"({result.seconds:.1f} s); {result.rows['holdout']} held-out rows, self-normalised IPS of the greedy policy:\n"
        f"  old: {figures(result.holdout_old)}\n  new: {figures(result.holdout_new)}\n"
        f"the refinement changed {100 * result.changed_decisions:.1f}% of the held-out decisions; {gain}\n"
        f"policy {result.policy_id!r}: {result.policy_dir}; figures: {out / 'from_log.json'}"
    )


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `tokenopt train`.")],
    onnx: Annotated[bool, typer.Option(help="Also write policy.onnx (logits only).")] = False,
) -> None:
    """Export a run's best model as a pickle-free runtime policy (RUN/policy/)."""
    from tokenopt.agents.export import export_run

    try:
        path = export_run(run, onnx=onnx)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    typer.echo(str(path))


@app.command("eval")
def eval_command(
    policy: Annotated[Path, typer.Argument(help="Run folder (with policy/) or exported policy folder.")],
    table: Annotated[Path, typer.Option(help="Outcome-table folder to evaluate on.")],
    split: Annotated[str, typer.Option(help="Split to report (baselines fit on train, chosen on val).")] = "test",
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.json, PNG plots and tb/.")] = Path(
        "runs/eval"
    ),
    cost_weights: Annotated[
        str, typer.Option(help="Comma-separated cost weights of the sweep (one trained policy each, reused if there).")
    ] = "0.0025,0.005,0.01,0.02,0.04,0.08,0.16",
    total_timesteps: Annotated[
        int | None, typer.Option(help="Training steps of the sweep's policies. Default: the run's own.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the baselines' classifiers.")] = 0,
    sweep_dir: Annotated[
        Path | None, typer.Option(help="Folder for the sweep's training runs. Default: OUT/sweep.")
    ] = None,
    probe_run: Annotated[
        Path | None,
        typer.Option(
            help="A `tokenopt train --env probe` run (or its policy folder) to score too, against the Dynasor- and "
            "DEER-style rules; the sweep trains one controller per missing weight with its settings (reused if there)."
        ),
    ] = None,
) -> None:
    """Score the policy against fixed budgets, TALE, Dynasor, DEER, Adaptive-Consistency, RouteLLM and the oracle."""
    from tokenopt.agents.evaluation.scoreboard import ScoreboardConfig, run_scoreboard

    try:
        weights = tuple(_split_list(cost_weights, float, "--cost-weights"))
        config = ScoreboardConfig(
            policy=str(policy), table=str(table), split=split, out=str(out), cost_weights=weights,
            total_timesteps=total_timesteps, seed=seed, sweep_dir=None if sweep_dir is None else str(sweep_dir),
            probe_run=None if probe_run is None else str(probe_run),
        )  # fmt: skip
        report = run_scoreboard(config, progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    bar = report["bar"]
    lines = [
        f"policy on or above every baseline's curve for {bar['weights_on_or_above']} of {bar['weights']} cost weights; "
        f"gap recovered at the default weight {bar['gap_recovered_at_default']:.2f}"
    ]
    if "probe_weights_on_or_above_rules" in bar:
        lines.append(
            f"probe controller on or above the Dynasor- and DEER-style curves for "
            f"{bar['probe_weights_on_or_above_rules']} of {bar['weights']} cost weights, higher reward than both for "
            f"{bar['probe_weights_beating_rules']}; gap recovered at the default weight "
            f"{bar['probe_gap_recovered_at_default']:.2f}"
        )
    typer.echo("\n".join([*lines, f"report: {out / 'report.md'}"]))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's table and run.")] = Path("runs/demo"),
    total_timesteps: Annotated[int | None, typer.Option(help="PPO steps. Default: from the YAML.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of training.")] = 0,
) -> None:
    """Collect the demo (reusing a cached table), train, export and evaluate on the test split."""
    from tokenopt.agents.export import evaluate_policy, export_run, format_table, save_report
    from tokenopt.agents.ppo.train import TrainConfig
    from tokenopt.agents.ppo.train import train as run_train
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


@app.command("gate")
def gate_command(
    new: Annotated[Path, typer.Argument(help="Candidate policy folder (policy.json + policy.npz).")],
    old: Annotated[Path, typer.Argument(help="Deployed policy folder to compare against.")],
    table: Annotated[Path, typer.Option(help="Outcome-table folder both policies were trained for.")],
    split: Annotated[str, typer.Option(help="Split whose queries are compared.")] = "test",
    cost_weight: Annotated[float, typer.Option(help="lambda in EM - lambda * tokens.")] = 0.01,
    max_em_drop: Annotated[float, typer.Option(help="Most EM points NEW may lose against OLD.")] = 1.0,
    reward_margin: Annotated[
        float, typer.Option(help="Pass when the lower bound of NEW - OLD mean reward is at least -margin.")
    ] = 0.0,
    confidence: Annotated[float, typer.Option(help="Confidence of the one-sided bootstrap bound, in (0, 1).")] = 0.95,
    resamples: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
) -> None:
    """Deployment gate: exit 0 if NEW is not worse than OLD on a split, 1 if it is, 2 on bad input."""
    from tokenopt.agents.evaluation.gate import GateConfig, format_gate, run_gate, save_gate

    try:
        settings = GateConfig(
            table=str(table),
            split=split,
            cost_weight=cost_weight,
            max_em_drop=max_em_drop,
            reward_margin=reward_margin,
            confidence=confidence,
            resamples=resamples,
            seed=seed,
        )
        result = run_gate(new, old, settings)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    typer.echo(format_gate(result))
    if json_path is not None:
        save_gate(json_path, result)
    raise typer.Exit(code=0 if result.passed else 1)


@app.command("cv")
def cv_command(
    table: Annotated[Path, typer.Option(help="Outcome-table folder written by `tokenopt collect`.")],
    folds: Annotated[int, typer.Option(help="K: number of folds (2 to the number of queries).")],
    out: Annotated[Path, typer.Option(help="Folder of the fold runs (fold-k/) and cv.json.")] = Path("runs/cv"),
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment and of training.")] = 0,
    timesteps: Annotated[int | None, typer.Option(help="PPO steps per fold. Default: n_timesteps from the YAML.")] = (
        None
    ),
    cost_weight: Annotated[float, typer.Option(help="lambda in EM - lambda * tokens.")] = 0.01,
    eval_freq: Annotated[int, typer.Option(help="Environment steps between validations.")] = 4096,
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping early.")] = 6,
    config: Annotated[
        Path | None, typer.Option(help="YAML of PPO hyperparameters keyed by env id. Default: agents/configs/ppo.yml.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Hyperparameter override key=value (repeatable).")
    ] = None,
) -> None:
    """K-fold cross-validation over query ids: train one policy per fold, test it on its fold."""
    from tokenopt.agents.evaluation.cv import cross_validate, format_cv
    from tokenopt.agents.ppo.train import CONFIG_DIR, TrainConfig

    try:
        settings = TrainConfig(
            table=str(table),
            config_file=str(config or CONFIG_DIR / "ppo.yml"),
            hyperparams=_parse_overrides(set_ or []),
            total_timesteps=timesteps,
            cost_weight=cost_weight,
            eval_freq=eval_freq,
            patience=patience,
        )
        with _progress() as progress:
            task = progress.add_task("cv", total=None)

            def report(fold: int, steps: int, metrics: dict[str, float]) -> None:
                description = f"cv fold {fold}/{folds} ({steps} steps, val reward {metrics['reward']:.3f})"
                progress.update(task, description=description)

            result = cross_validate(settings, folds, out=out, seed=seed, progress=report)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    typer.echo(f"{folds}-fold cross-validation on {table} (test fold of each, lambda {cost_weight:g}):\n")
    typer.echo(format_cv(result))
    console.print(f"cv.json and the fold runs are in {out} ({result.seconds:.0f} s)")


@app.command("tune")
def tune_command(
    table: Annotated[Path, typer.Option(help="Outcome-table folder written by `tokenopt collect`.")],
    sampler: Annotated[str, typer.Option(help="tpe, random, or grid (learning rate x network width).")] = "tpe",
    trials: Annotated[int, typer.Option(help="Total trials of the study, earlier runs' included.")] = 20,
    study_name: Annotated[str, typer.Option(help="Optuna study name.")] = "tokenopt-tune",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL. Default: sqlite:///OUT/study.db.")] = None,
    out: Annotated[Path, typer.Option(help="Folder of the trial runs, the study and best.yml.")] = Path("runs/tune"),
    timesteps: Annotated[int | None, typer.Option(help="PPO steps per trial. Default: n_timesteps from the YAML.")] = (
        None
    ),
    objective: Annotated[str, typer.Option(help="reward (maximise), or tokens (minimise; needs --em-floor).")] = (
        "reward"
    ),
    em_floor: Annotated[
        float | None, typer.Option(help="Adapt lambda: validation EM at most this many points below max greedy.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of training.")] = 0,
    cost_weight: Annotated[float, typer.Option(help="lambda in EM - lambda * tokens (start value if constrained).")] = (
        0.01
    ),
    eval_freq: Annotated[int, typer.Option(help="Environment steps between validations (pruning points).")] = 4096,
    config: Annotated[
        Path | None, typer.Option(help="Base YAML of PPO hyperparameters. Default: agents/configs/ppo.yml.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Fixed hyperparameter override key=value (repeatable).")
    ] = None,
) -> None:
    """Tune PPO hyperparameters with Optuna (resumable); write the best set as OUT/best.yml."""
    from tokenopt.agents.ppo.train import CONFIG_DIR, TrainConfig
    from tokenopt.agents.ppo.tune import TuneConfig, tune

    try:
        base = TrainConfig(
            table=str(table),
            config_file=str(config or CONFIG_DIR / "ppo.yml"),
            hyperparams=_parse_overrides(set_ or []),
            total_timesteps=timesteps,
            cost_weight=cost_weight,
            em_floor=em_floor,
            eval_freq=eval_freq,
        )
        settings = TuneConfig(
            sampler=sampler,
            trials=trials,
            study_name=study_name,
            storage=storage,
            out=str(out),
            objective=objective,
            seed=seed,
        )
        with _progress() as progress:
            task = progress.add_task("tune", total=None)

            def report(trial: int, steps: int, metrics: dict[str, float]) -> None:
                description = f"tune trial {trial} ({steps} steps, val reward {metrics['reward']:.3f})"
                progress.update(task, description=description)

            result = tune(base, settings, progress=report)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    metrics = result.best_metrics
    typer.echo(
        f"study {result.study_name!r}: ran {result.trials_run} trials, {result.trials_finished} finished "
        f"({result.trials_pruned} pruned)\n"
        f"best trial {result.best_trial} ({result.best_run_dir}): {objective} objective {result.best_value:.4f}; "
        f"validation EM {metrics.get('em', 0):.3f}, tokens {metrics.get('tokens', 0):.2f}, "
        f"reward {metrics.get('reward', 0):.3f}\n"
        f"params: {json.dumps(result.best_params)}\n"
        f"best config: {result.best_config} (tokenopt train --table {table} --config {result.best_config})"
    )


@app.command("ab-report")
def ab_report_command(
    log: Annotated[Path, typer.Argument(help="Decision log the server writes with --log.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of Markdown.")] = False,
    alpha: Annotated[float, typer.Option(help="Significance level of both two-sided tests, in (0, 1).")] = 0.05,
) -> None:
    """Compare arms A and B of a decision log: EM (z-test on feedback) and billed tokens (Welch's t-test)."""
    from tokenopt.agents.evaluation.ab_test import ab_report, format_ab_report

    try:
        report = ab_report(log, alpha)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
        return
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_output else format_ab_report(report))


@app.command("serve")
def serve_command(
    policy: Annotated[Path, typer.Option(help="Policy folder (runs/<run>/policy) of arm A.")],
    model: Annotated[
        str | None, typer.Option(help="Local causal-LM folder to serve. Default (no --upstream): the demo LM.")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="Base URL of an OpenAI-compatible server to proxy (vLLM, TGI, llama.cpp).")
    ] = None,
    upstream_model: Annotated[str, typer.Option(help="Model name sent to the upstream.")] = "default",
    upstream_api_key: Annotated[
        str | None, typer.Option(envvar="TOKENOPT_UPSTREAM_API_KEY", help="Bearer token for the upstream.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="TOKENOPT_API_KEY", help="Bearer token clients must send.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback bind without an API key.")] = False,
    policy_b: Annotated[Path | None, typer.Option(help="Policy folder of arm B (A/B test).")] = None,
    split: Annotated[float, typer.Option(help="Share of users sent to arm B, in [0, 1].")] = 0.5,
    log: Annotated[Path, typer.Option(help="Decision log (SQLite, WAL).")] = Path("runs/serve/decisions.sqlite"),
    log_prompts: Annotated[bool, typer.Option(help="Also store prompt texts in the decision log.")] = False,
    explore: Annotated[
        float, typer.Option(help="Share of requests served a random action, logged with its propensity, in [0, 1].")
    ] = 0.0,
    max_concurrency: Annotated[int, typer.Option(help="Requests processed at once.")] = 64,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond that; past it, 429.")] = 256,
    timeout: Annotated[float, typer.Option(help="Seconds before a request gets 504.")] = 60.0,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt accepted (413 past it).")] = 32_000,
    max_batch: Annotated[int, typer.Option(help="Requests the local LM decodes together.")] = 32,
    device: Annotated[str, typer.Option(help="Device of the local LM: auto, cpu, cuda, cuda:N, mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype of the local LM: auto, float32, float16, bfloat16.")] = "auto",
    prompt_template: Annotated[str, typer.Option(help="Prompt template with a {question} placeholder.")] = "{question}",
    answer_cue: Annotated[str, typer.Option(help="Cue appended when the budget runs out (budget forcing).")] = "=",
    answer_regex: Annotated[str | None, typer.Option(help="Regex that reads the answer after the cue.")] = None,
    max_answer_tokens: Annotated[int, typer.Option(help="Most tokens an answer may have.")] = 8,
    chat_template: Annotated[bool, typer.Option(help="Wrap prompts in the tokenizer's chat template.")] = False,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads of the local LM; 0: one fewer than the cores (at least 1).")
    ] = 0,
) -> None:
    """Serve the policy behind OpenAI-compatible endpoints (needs `pip install tokenopt[serve]`)."""
    try:
        import uvicorn

        from tokenopt.serve import ServeConfig, create_app
    except ImportError as error:
        _fail(ImportError(f"{error}: the server needs the serve extra: pip install 'tokenopt[serve]'"))
        return
    from tokenopt.runtime import PolicyLoadError

    try:
        config = ServeConfig(
            policy=policy,
            policy_b=policy_b,
            split=split,
            model=model,
            upstream=upstream,
            upstream_model=upstream_model,
            upstream_api_key=upstream_api_key,
            host=host,
            port=port,
            api_key=api_key,
            insecure=insecure,
            log=log,
            log_prompts=log_prompts,
            explore=explore,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            timeout=timeout,
            max_prompt_chars=max_prompt_chars,
            max_batch=max_batch,
            device=device,
            dtype=dtype,
            prompt_template=prompt_template,
            answer_cue=answer_cue,
            answer_regex=answer_regex,
            max_answer_tokens=max_answer_tokens,
            chat_template=chat_template,
            threads=threads or max(1, (os.cpu_count() or 2) - 1),
        )
        application = create_app(config)
    except (ValueError, FileNotFoundError, PolicyLoadError) as error:
        _fail(error)
        return
    arms = ", ".join(f"{name}={arm.policy.policy_id}" for name, arm in application.state.tokenopt.arms.items())
    console.print(f"serving {arms} on http://{host}:{port}/v1 (decision log {log}); SIGHUP reloads the policies")
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


if __name__ == "__main__":  # pragma: no cover
    app()
