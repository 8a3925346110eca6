"""The robustness suites (suites/): each builds end to end at a tiny size, through ``tokenopt collect``."""

from __future__ import annotations

import json
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


@pytest.fixture
def build(monkeypatch):
    # The suites run from the repository root and are not installed (suites/README.md).
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from suites.build import main

    return main


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_builds_end_to_end_at_a_tiny_size(tmp_path, build, name):
    model_type, tokenizer_class, actions = SUITES[name]
    out = tmp_path / name
    build([name, "--out", str(out), "--questions", "12", "--steps", "4", "--batch-size", "8"])
    record = json.loads((out / "build.json").read_text())
    assert record["questions"] == 12 and record["model_source"] == "trained"
    assert record["collect_command"].startswith("tokenopt collect ")

    # The LM is of the suite's architecture, and its tokenizer survives the loading path users take.
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    assert type(tokenizer).__name__ == tokenizer_class
    lines = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert all(line["id"].startswith(name) for line in lines)
    for line in lines:
        for text in (line["question"], *line["answers"]):
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # A BPE, not one token per character: the spaced questions merge into fewer tokens than characters.
    assert sum(len(tokenizer(line["question"])["input_ids"]) for line in lines) < sum(
        len(line["question"]) for line in lines
    )

    matrix = OutcomeMatrix.from_table(out / "table")
    assert list(matrix.actions) == actions
    assert sorted(matrix.ids) == sorted(line["id"] for line in lines)


def test_questions_are_seeded_and_a_committed_checkpoint_is_reused(tmp_path, build):
    first, second = tmp_path / "a", tmp_path / "b"
    build(["qwen2_letters", "--out", str(first), "--questions", "60", "--no-train"])
    build(["qwen2_letters", "--out", str(second), "--questions", "60", "--no-collect"])
    # The question file is a function of the suite's seed alone.
    assert (first / "questions.jsonl").read_bytes() == (second / "questions.jsonl").read_bytes()
    families = {json.loads(line)["family"] for line in (first / "questions.jsonl").read_text().splitlines()}
    assert families == {"next", "lookup", "count"}
    assert not (first / "model").exists()
    # Without --retrain (or --steps) the committed checkpoint is copied, not retrained.
    assert json.loads((second / "build.json").read_text())["model_source"].startswith("committed")
    committed = ROOT / "suites" / "qwen2_letters" / "model" / "model.safetensors"
    assert (second / "model" / "model.safetensors").read_bytes() == committed.read_bytes()


def test_unknown_suite_is_refused_with_the_known_names(tmp_path, build, capsys):
    with pytest.raises(SystemExit):
        build(["nope", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert "gpt2_bits" in error and "qwen2_letters" in error
