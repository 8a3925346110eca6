"""Build a robustness suite: its question file, its LM, and its outcome table.

    python -m suites.build NAME --out DIR [--questions N] [--steps N] [--batch-size N] [--threads N]

writes ``DIR/questions.jsonl``, puts the LM in ``DIR/model`` (a copy of the suite's
committed checkpoint ``suites/NAME/model``, or with ``--retrain`` trained anew: seeded,
so the same torch build and thread count give the same weights), then runs
``tokenopt collect`` into ``DIR/table``. ``DIR/build.json`` records the commands,
sizes and wall times. An existing model or table is reused unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from suites.registry import SUITE_NAMES, load_suite
from suites.spec import Suite
from tokenopt.demo.suite import write_jsonl
from tokenopt.demo.train import train_lm

__all__ = ["build_suite", "collect_command", "main"]

logger = logging.getLogger(__name__)

_STAGES = ("questions", "model", "table")

SUITES_DIR = Path(__file__).resolve().parent
"""Where each suite's folder (and its committed checkpoint, ``<name>/model``) lives."""


def collect_command(suite: Suite, questions: Path, model: Path, table: Path) -> list[str]:
    """The ``tokenopt collect`` command line of a suite (the CLI, as a user runs it)."""
    return [
        "tokenopt",
        "collect",
        "--data",
        str(questions),
        "--model",
        str(model),
        "--out",
        str(table),
        "--budgets",
        ",".join(map(str, suite.budgets)),
        "--modes",
        ",".join(suite.modes),
        "--answer-cue",
        suite.answer_cue,
        "--max-answer-tokens",
        str(suite.max_answer_tokens),
        "--device",
        "cpu",
        "--seed",
        str(suite.seed),
        *suite.extra_collect_args,
    ]


def build_suite(
    suite: Suite,
    out: Path,
    n_questions: int | None = None,
    steps: int | None = None,
    threads: int | None = None,
    force: bool = False,
    stages: str = "table",
    batch_size: int | None = None,
    retrain: bool = False,
) -> dict[str, object]:
    """Write the question file, train the LM and collect the table of a suite.

    Args:
        suite: the suite.
        out: folder for ``questions.jsonl``, ``model/``, ``table/`` and ``build.json``.
        n_questions: questions to write; the suite's default when None.
        steps: training steps of the LM; the suite's default when None.
        threads: torch threads for training; the suite's default (1) when None.
        force: rebuild a model or table that exists.
        stages: the last stage to run: ``questions``, ``model`` or ``table``.
        batch_size: examples per training step; the suite's default when None.
        retrain: train the LM even where the suite has a committed checkpoint (a given
            ``steps`` or ``batch_size`` retrains too).

    Raises:
        ValueError: an unknown stage.

    Returns:
        What ``build.json`` records.
    """
    if stages not in _STAGES:
        raise ValueError(f"unknown stage {stages!r}; expected one of {', '.join(_STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"suite": suite.name, "held_out": suite.held_out}
    questions = out / "questions.jsonl"
    records = suite.questions(n_questions)
    write_jsonl(records, questions)
    record["questions"] = len(records)
    model = out / "model"
    config = replace(
        suite.train,
        steps=suite.train.steps if steps is None else steps,
        threads=suite.train.threads if threads is None else threads,
        batch_size=suite.train.batch_size if batch_size is None else batch_size,
    )
    if stages == "questions":
        return _write_record(out, record)
    if force and model.exists():
        shutil.rmtree(model)
    committed = SUITES_DIR / suite.name / "model"
    retrain = retrain or steps is not None or batch_size is not None or not (committed / "model.safetensors").is_file()
    if not (model / "model.safetensors").is_file() and not retrain:
        shutil.copytree(committed, model, dirs_exist_ok=True)
        record["model_source"] = f"committed checkpoint suites/{suite.name}/model"
    if not (model / "model.safetensors").is_file():
        record["model_source"] = "trained"
        started = time.perf_counter()

        def report(step: int, total: int, loss: float) -> None:
            if step % 100 == 0 or step == total:
                seconds = time.perf_counter() - started
                logger.info("%s: step %d/%d, loss %.3f, %.0f s", suite.name, step, total, loss, seconds)

        summary = train_lm(model, suite.task(), config, progress=report)
        (model / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        record["train_seconds"] = round(time.perf_counter() - started, 1)
        record["training"] = summary
    if stages == "table":
        table = out / "table"
        if force and table.exists():
            shutil.rmtree(table)
        command = collect_command(suite, questions, model, table)
        record["collect_command"] = shlex.join(command)
        started = time.perf_counter()
        # The CLI in a subprocess, exactly as documented; the module form finds this interpreter's tokenopt.
        subprocess.run([sys.executable, "-m", "tokenopt.cli", *command[1:]], check=True)
        record["collect_seconds"] = round(time.perf_counter() - started, 1)
    return _write_record(out, record)


def _write_record(out: Path, record: dict[str, object]) -> dict[str, object]:
    """Merge a build's record into ``build.json`` (a rerun that reuses the model keeps its training record)."""
    path = out / "build.json"
    merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    merged.update(record)
    path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return merged


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=SUITE_NAMES, help="the suite to build")
    parser.add_argument("--out", type=Path, required=True, help="folder for questions.jsonl, model/ and table/")
    parser.add_argument("--questions", type=int, default=None, help="number of questions (default: the suite's)")
    parser.add_argument("--steps", type=int, default=None, help="LM training steps (default: the suite's)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the suite's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for training (default 1)")
    parser.add_argument("--force", action="store_true", help="rebuild an existing model and table")
    parser.add_argument("--retrain", action="store_true", help="train the LM instead of copying the committed one")
    parser.add_argument("--no-collect", action="store_true", help="stop after training the LM")
    parser.add_argument("--no-train", action="store_true", help="write the question file only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stages = "questions" if args.no_train else "model" if args.no_collect else "table"
    record = build_suite(
        load_suite(args.name),
        args.out,
        n_questions=args.questions,
        steps=args.steps,
        threads=args.threads,
        force=args.force,
        stages=stages,
        batch_size=args.batch_size,
        retrain=args.retrain,
    )
    print(json.dumps({k: v for k, v in record.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
