"""``tokenopt collect``: the outcome table of every (budget, mode) action on every query."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tokenopt.cli.common import ConfigOptions, Flag, config_options, console, fail, progress

__all__ = ["COLLECT_OPTIONS", "RAY_OPTIONS", "add_features_command", "collect_command"]

COLLECT_OPTIONS = ConfigOptions(
    "tokenopt.collect.config:CollectConfig",
    flags={
        "use_chat_template": Flag(name="--chat-template"),
        "splits": Flag(
            name="--split",
            kind=list[str] | None,
            default=None,
            help="Collect only this split (repeatable). Default: all.",
            parse=lambda splits: list(splits) if splits else None,
        ),
        "upstream_api_key": Flag(envvar="TOKENOPT_UPSTREAM_API_KEY"),
    },
    paths=("out", "data"),
)
"""Every field of :class:`~tokenopt.collect.config.CollectConfig` is a flag."""

RAY_OPTIONS = ConfigOptions(
    "tokenopt.collect.ray:RayConfig",
    fields=("workers", "cpus_per_worker", "gpus_per_worker"),
    flags={"workers": Flag(name="--ray-workers")},
    help_prefix="With --ray: ",
)


@config_options(settings=COLLECT_OPTIONS, ray_settings=RAY_OPTIONS)
def collect_command(
    *,
    settings: dict[str, Any],
    ray: Annotated[
        bool,
        typer.Option(
            help=escape(
                "Spread the shards over Ray workers: --ray starts Ray here, --ray ADDRESS joins a cluster. "
                "Needs pip install 'tokenopt[ray]'."
            )
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        # Typer has no option with an optional value, so --ray is a flag and the address an argument after it.
        typer.Argument(help="With --ray: host:port, ray://host:port, auto, or local (the default)."),
    ] = None,
    ray_settings: dict[str, Any],
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
        config = CollectConfig(**settings)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        argv = list(sys.argv[1:])
        for index, word in enumerate(argv):  # command.txt must not hold the upstream's key
            if word.startswith("--upstream-api-key="):
                argv[index] = "--upstream-api-key=***"
            elif index > 0 and sys.argv[index] == "--upstream-api-key":
                argv[index] = "***"
        (out / "command.txt").write_text(" ".join(["tokenopt", *argv]) + "\n", encoding="utf-8")
        with progress() as bars:
            task = bars.add_task("collect", total=None)

            def report(done: int, total: int) -> None:
                bars.update(task, completed=done, total=total)

            if ray_address is not None and not ray:
                raise ValueError(f"unexpected argument {ray_address!r}: a Ray address follows --ray")
            if ray:
                from tokenopt.collect.ray import RayConfig, collect_ray

                summary = collect_ray(config, RayConfig(ray_address, **ray_settings), progress=report)
            else:
                summary = run_collect(config, progress=report)
    except (ValueError, FileNotFoundError, UpstreamError, ImportError) as error:
        fail(error)
    if summary.skipped:
        console.print(f"[yellow]warning:[/yellow] skipped {len(summary.skipped)} queries longer than the context")
    console.print(
        f"wrote {summary.rows} rows for {summary.queries} queries to {summary.out} "
        f"({summary.shards_written} shards written, {summary.shards_reused} reused) in {summary.seconds:.1f} s"
    )


def add_features_command(
    table: Annotated[Path, typer.Argument(help="A finished outcome table (`tokenopt collect --out`).")],
    features: Annotated[
        str, typer.Option(help="Feature spec whose columns to record: lm-hidden or prompt-text+lm-hidden.")
    ] = "lm-hidden",
    hidden_layer: Annotated[
        int | None, typer.Option(help="Layer of the hidden state (0: embeddings, i: block i). Default: the middle.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Where the table's model is now, if it moved. Default: the manifest's.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Prompts per prefill pass.")] = 32,
) -> None:
    """Record a feature spec's columns in a finished table: a prefill pass, no decoding.

    For lm-hidden: loads the table's own model and prompt format (from its manifest),
    computes each query's hidden state at prefill (the mean over the prompt's tokens of
    one layer) and adds it to features.parquet. The outcome rows are not touched.
    """
    from tokenopt.collect import add_features

    try:
        with progress() as bars:
            bars.add_task("prefill", total=None)
            source = add_features(table, features, hidden_layer, model, device, dtype, batch_size)
    except (ValueError, FileNotFoundError, ImportError) as error:
        fail(error)
    if source is None:
        console.print(f"{features}: nothing to add (prompt-text is always recorded)")
    else:
        console.print(
            f"recorded lm-hidden (layer {source.layer} of {source.model}, {source.size} numbers per query) in {table}"
        )
