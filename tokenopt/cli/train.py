"""``tokenopt train``: PPO on an outcome table (``--seeds``, ``--ensemble``), or a refinement ``--from-log``."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenopt.cli.common import ConfigOptions, Flag, config_options, console, fail, parse_overrides, progress

__all__ = ["CONFIG_FILE_FLAG", "FROM_LOG_OPTIONS", "SET_FLAG", "TRAIN_CONFIG", "TRAIN_OPTIONS", "train_command"]

TRAIN_CONFIG = "tokenopt.agents.ppo.train:TrainConfig"

CONFIG_FILE_FLAG = Flag(
    name="--config",
    kind=Path | None,
    default=None,
    help="YAML of PPO hyperparameters keyed by env id. Default: agents/configs/ppo.yml.",
)
"""``TrainConfig.config_file`` as ``--config`` (train, cv, tune)."""

SET_FLAG = Flag(
    name="--set",
    kind=list[str] | None,
    default=None,
    help="Hyperparameter override key=value (repeatable).",
    parse=lambda pairs: parse_overrides(pairs or []),
)
"""``TrainConfig.hyperparams`` as repeatable ``--set key=value`` (train, cv, tune)."""

TRAIN_OPTIONS = ConfigOptions(
    TRAIN_CONFIG,
    fields=(
        "table",
        "out",
        "config_file",
        "env",
        "algo",
        "total_timesteps",
        "cost_weight",
        "em_floor",
        "token_target",
        "seed",
        "eval_freq",
        "patience",
        "hyperparams",
        "init_from",
        "init_lr_scale",
        "features",
        "hidden_dim",
        "cost_weight_range",
    ),  # fmt: skip
    flags={
        "table": Flag(
            kind=Path | None,
            default=None,
            help="Outcome-table folder written by `tokenopt collect` (not with --from-log).",
        ),
        "config_file": CONFIG_FILE_FLAG,
        "hyperparams": SET_FLAG,
    },
    paths=("out", "init_from"),
)

FROM_LOG_OPTIONS = ConfigOptions(
    "tokenopt.agents.from_log:FromLogConfig",
    fields=("log", "arm", "epochs", "clip"),
    flags={
        "log": Flag(
            name="--from-log",
            kind=list[Path] | None,
            default=None,
            help="Refine the --init-from policy off-policy on this decision log's feedback (no table). Repeatable, "
            "and folders or quoted glob patterns ('logs/*.sqlite') are read too: several replicas' logs are read "
            "together, feedback joined across them.",
            parse=lambda paths: [str(path) for path in paths or []],
        ),
        # None, not the field's default, so that giving them without --from-log is an error.
        "epochs": Flag(default=None),
        "clip": Flag(default=None),
    },
    help_prefix="With --from-log: ",
)


@config_options(settings=TRAIN_OPTIONS, from_log=FROM_LOG_OPTIONS)
def train_command(
    *,
    settings: dict[str, Any],
    export: Annotated[bool, typer.Option(help="Export the best model as RUN/policy/ when done.")] = True,
    seeds: Annotated[
        int, typer.Option(help="Train this many runs, with seeds SEED, SEED+1, ..., into OUT/seed-<s>/.")
    ] = 1,
    ensemble: Annotated[
        bool,
        typer.Option(help="With --seeds N>1: also export one policy averaging the runs (OUT/policy/) and compare."),
    ] = False,
    from_log: dict[str, Any],
    fallback: Annotated[
        bool,
        typer.Option(
            help="Do no harm: when the policy does not beat the best fixed action on val beyond the noise, export "
            "a policy that always picks that action (the learned one goes to RUN/policy-learned/). "
            "--no-fallback exports the learned policy anyway."
        ),
    ] = True,
) -> None:
    """Train a PPO agent on an outcome table, validate it, and export the best policy.

    With --seeds N, train N runs into OUT/seed-<s>/ and compare their policies on the
    test split; --ensemble adds one policy averaging them (OUT/policy/, OUT/ensemble.json).
    With --from-log LOG --init-from POLICY, refine an exported policy on a server's
    decision log instead (clipped importance-weighted policy gradient; OUT/from_log.json).
    """
    out = Path(settings["out"])
    if from_log.get("log"):
        given = {"--table": "table" in settings, "--env": settings["env"] != "budget",
                 "--algo": settings["algo"] != "ppo", "--config": "config_file" in settings,
                 "--total-timesteps": settings["total_timesteps"] is not None,
                 "--em-floor": settings["em_floor"] is not None, "--token-target": settings["token_target"] is not None,
                 "--seeds": seeds != 1, "--ensemble": ensemble}  # fmt: skip
        _train_from_log(settings, from_log, [option for option, used in given.items() if used])
        return
    only_from_log = {"--arm": from_log["arm"] != "A", "--epochs": "epochs" in from_log, "--clip": "clip" in from_log}
    if any(only_from_log.values()) or "table" not in settings:
        used = [option for option, value in only_from_log.items() if value]
        fail(
            ValueError(f"{used} apply only with --from-log LOG")
            if used
            else ValueError(
                "give --table (the outcome table to train on), or --from-log LOG --init-from POLICY_DIR "
                "(refine a policy on a server's decision log)"
            )
        )

    import yaml

    from tokenopt.agents.common.run_dir import RunDir
    from tokenopt.agents.evaluation.no_harm import apply_no_harm, format_no_harm
    from tokenopt.agents.evaluation.report import format_seed_report, seed_report
    from tokenopt.agents.export import export_ensemble, export_run
    from tokenopt.agents.ppo.train import TrainConfig, TrainResult
    from tokenopt.agents.ppo.train import train as run_train
    from tokenopt.cost import CostModel

    table = Path(settings["table"])
    seed, cost_weight = settings["seed"], settings["cost_weight"]
    try:
        config = TrainConfig(**settings)
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        if ensemble and seeds < 2:
            raise ValueError(f"--ensemble averages several runs: give --seeds 2 or more (got --seeds {seeds})")
        runs = [(seed, out)] if seeds == 1 else [(seed + k, out / f"seed-{seed + k}") for k in range(seeds)]
        results: list[TrainResult] = []
        with progress() as bars:
            for run_seed, run_dir in runs:
                name = "train" if seeds == 1 else f"train seed {run_seed}"
                task = bars.add_task(name, total=None)

                def report(steps: int, _: int, metrics: dict[str, float], task: Any = task, name: str = name) -> None:
                    bars.update(
                        task,
                        completed=steps,
                        description=f"{name} (val reward {metrics['reward']:.3f}, gap {metrics['gap_recovered']:.2f})",
                    )

                results.append(run_train(replace(config, seed=run_seed, out=str(run_dir)), progress=report))
        no_harm: dict[Path, dict[str, Any] | None] = {}
        if export or ensemble:
            for _, run_dir in runs:
                export_run(run_dir)
                no_harm[run_dir] = apply_no_harm(run_dir, fallback=fallback and not ensemble, seed=seed)
        if ensemble:
            export_ensemble([run_dir for _, run_dir in runs], out / "policy")
            # The rule applies to what is shipped: the ensemble, checked with its members' settings.
            members = yaml.safe_load(RunDir(runs[0][1]).config.read_text(encoding="utf-8"))
            no_harm[out] = apply_no_harm(out, fallback=fallback, seed=seed, config=members)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    for (run_seed, run_dir), result in zip(runs, results, strict=True):
        best = result.best_metrics
        console.print(
            f"{'' if seeds == 1 else f'seed {run_seed}: '}trained {result.timesteps} steps in {result.seconds:.0f} s; "
            f"best validation: EM {best.get('em', 0):.3f}, tokens {best.get('tokens', 0):.2f}, "
            f"reward {best.get('reward', 0):.3f}, gap recovered {best.get('gap_recovered', 0):.2f}; "
            f"TensorBoard logs in {run_dir / 'tb'}"
        )
        if no_harm.get(run_dir) is not None:
            console.print(format_no_harm(no_harm[run_dir]), highlight=False, markup=False)
    learned_ensemble = out / "policy"
    checked = no_harm.get(out)
    if checked is not None:
        console.print(f"ensemble of the {seeds} seeds ({out / 'policy'}):", soft_wrap=True)
        console.print(format_no_harm(checked), highlight=False, markup=False)
        learned_ensemble = Path(checked["learned_policy"])
    if seeds > 1 and (export or ensemble):
        try:
            comparison = seed_report(
                {f"seed {run_seed}": run_dir / "policy" for run_seed, run_dir in runs},
                table,
                CostModel(cost_weight),
                ensemble=learned_ensemble if ensemble else None,
            )
        except ValueError as error:
            fail(error)
        report_path = out / ("ensemble.json" if ensemble else "seeds.json")
        report_path.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"Test split, {comparison['queries']} queries, lambda {cost_weight:g} per billed token:\n")
        typer.echo(format_seed_report(comparison))
        if ensemble:
            best_single = max(comparison["singles"], key=lambda entry: entry["reward"])
            verdict = "beats" if comparison["ensemble"]["reward"] > best_single["reward"] else "does not beat"
            typer.echo(
                f"\nThe ensemble ({learned_ensemble}) {verdict} the best single policy ({best_single['policy']}) "
                f"on test reward: {comparison['ensemble']['reward']:.4f} vs {best_single['reward']:.4f} "
                f"(mean of singles {comparison['mean_single']['reward']:.4f})."
            )
        typer.echo(f"Report: {report_path}")


def _train_from_log(settings: dict[str, Any], from_log: dict[str, Any], conflicting: list[str]) -> None:
    """``tokenopt train --from-log``: refine an exported policy on a decision log and report the held-out figures."""
    from tokenopt.agents.from_log import FromLogConfig, refine_from_log

    out = Path(settings["out"])
    arm = from_log["arm"]
    try:
        if conflicting:
            raise ValueError(
                f"--from-log refines an exported policy on a decision log; {conflicting} train PPO on an outcome "
                "table and do not apply"
            )
        if settings.get("init_from") is None:
            raise ValueError("--from-log needs the policy to refine: --init-from POLICY_DIR (an exported policy)")
        config = FromLogConfig(log=from_log["log"], init_from=settings["init_from"], out=str(out), arm=arm,
                               cost_weight=settings["cost_weight"], seed=settings["seed"])  # fmt: skip
        explicit = {key: from_log[key] for key in ("epochs", "clip") if key in from_log}
        config = config.with_overrides(settings.get("hyperparams", {}) | explicit)
        result = refine_from_log(config)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    (out / "command.txt").write_text(" ".join(["tokenopt", *sys.argv[1:]]) + "\n", encoding="utf-8")
    for note in result.log_notes:
        console.print(f"note: {note}")
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
