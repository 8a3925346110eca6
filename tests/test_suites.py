"""The robustness suites (suites/): each builds end to end at a tiny size, through ``tokenopt collect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tokenopt.table import OutcomeMatrix

ROOT = Path(__file__).resolve().parent.parent

SUITES = {
    # name: (model_type, tokenizer class AutoTokenizer must load, actions of the table)
    "gpt2_bits": ("gpt2", "GPT2Tokenizer", [f"b{b}/{m}" for m in ("greedy", "sc5") for b in (0, 4, 8, 16, 32)]),
    "qwen2_letters": ("qwen2", "Qwen2Tokenizer", [f"b{b}/greedy" for b in (0, 4, 8, 16, 32)]),
}


def _build(name: str, out: Path, questions: int = 24, steps: int = 8) -> subprocess.CompletedProcess[str]:
    # The suites are run from the repository root (they are not installed), as the README says.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "suites.build", name, "--out", str(out)]
    command += ["--questions", str(questions), "--steps", str(steps), "--batch-size", "8"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_builds_end_to_end_at_a_tiny_size(tmp_path, name):
    model_type, tokenizer_class, actions = SUITES[name]
    out = tmp_path / name
    result = _build(name, out)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "build.json").read_text())
    assert record["questions"] == 24 and record["collect_command"].startswith("tokenopt collect ")

    # The LM is of the suite's architecture, and its tokenizer survives the loading path users take.
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    assert type(tokenizer).__name__ == tokenizer_class
    lines = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert {line["family"] for line in lines} and all(line["id"].startswith(name) for line in lines)
    for line in lines:
        for text in (line["question"], *line["answers"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    # A BPE, not one token per character: the spaced questions merge into fewer tokens than characters.
    total_ids = sum(len(tokenizer(line["question"])["input_ids"]) for line in lines)
    assert total_ids < sum(len(line["question"]) for line in lines)

    matrix = OutcomeMatrix.from_table(out / "table")
    assert list(matrix.actions) == actions
    assert sorted(matrix.ids) == sorted(line["id"] for line in lines)


def test_suite_questions_are_seeded(tmp_path):
    # The question file is a function of the suite's seed alone: two builds write the same bytes.
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        command = ["qwen2_letters", "--out", str(out), "--questions", "50", "--no-train"]
        result = subprocess.run(
            [sys.executable, "-m", "suites.build", *command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert (first / "questions.jsonl").read_bytes() == (second / "questions.jsonl").read_bytes()
    families = {json.loads(line)["family"] for line in (first / "questions.jsonl").read_text().splitlines()}
    assert families == {"next", "lookup", "count"}


def test_unknown_suite_is_refused_with_the_known_names(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "suites.build", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "gpt2_bits" in result.stderr and "qwen2_letters" in result.stderr
