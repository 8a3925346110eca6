"""Question files: JSONL with one ``{"id", "question", "answers"}`` object per line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SPLITS", "Query", "assign_split", "load_questions"]

SPLITS = ("train", "val", "test")
"""The splits a query can belong to."""

_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Query:
    """One question with its gold answers, split and any extra fields of its line."""

    id: str
    question: str
    answers: tuple[str, ...]
    split: str
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)


def assign_split(query_id: str, seed: int = 0) -> str:
    """The split of a query id by a seeded hash: 60% train, 20% val, 20% test."""
    digest = hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    threshold = 0.0
    for split, fraction in zip(SPLITS, _SPLIT_FRACTIONS, strict=True):
        threshold += fraction
        if position < threshold:
            return split
    return SPLITS[-1]


def load_questions(path: str | Path, seed: int = 0) -> list[Query]:
    """Read and validate a question file.

    Each line holds a JSON object with ``id`` (string), ``question`` (string) and
    ``answers`` (non-empty list of strings), and optionally ``split`` (train, val or
    test; assigned by a seeded hash of the id when absent). Other fields are kept.

    Args:
        path: the JSONL file.
        seed: seed of the split hash.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, or a line is malformed; the message names
            the file, the line and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {str(path)!r} does not exist")
    queries: list[Query] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            query_id = record.get("id")
            if isinstance(query_id, int) and not isinstance(query_id, bool):
                query_id = str(query_id)
            if not isinstance(query_id, str) or not query_id:
                raise ValueError(f"{where}: 'id' must be a non-empty string, got {query_id!r}")
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
            answers = record.get("answers")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(
                    f"{where}: 'answers' must be a non-empty list of strings, got {answers!r} (query {query_id!r})"
                )
            if query_id in first_line_of:
                raise ValueError(f"{where}: duplicate id {query_id!r} (first seen on line {first_line_of[query_id]})")
            first_line_of[query_id] = number
            split = record.get("split")
            if split is None:
                split = assign_split(query_id, seed)
            elif split not in SPLITS:
                raise ValueError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            extra = {k: v for k, v in record.items() if k not in {"id", "question", "answers", "split"}}
            queries.append(Query(query_id, question, tuple(answers), split, extra))
    if not queries:
        raise ValueError(f"question file {str(path)!r} is empty: expected one JSON object per line")
    return queries
