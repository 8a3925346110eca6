import json

import pytest

from tokenopt.data import assign_split, load_questions


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_and_keeps_extra_fields(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        [
            json.dumps({"id": "a", "question": "1+1?", "answers": ["2"], "topic": "math"}),
            json.dumps({"id": "b", "question": "2+2?", "answers": ["4"], "split": "test"}),
        ],
    )
    queries = load_questions(path)
    assert [q.id for q in queries] == ["a", "b"]
    assert queries[0].extra == {"topic": "math"}
    assert queries[0].split == assign_split("a")
    assert queries[1].split == "test"


def test_split_hash_is_seeded_and_balanced():
    splits = [assign_split(f"q{i}", seed=3) for i in range(3000)]
    assert splits == [assign_split(f"q{i}", seed=3) for i in range(3000)]
    assert 0.55 < splits.count("train") / 3000 < 0.65
    assert splits != [assign_split(f"q{i}", seed=4) for i in range(3000)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "question": "q", "answers": ["x"]}', "{not json"], r"q.jsonl:2: not valid JSON"),
        (['{"id": "a", "question": "q"}'], r"q.jsonl:1: 'answers' must be a non-empty list"),
        (['{"id": "a", "question": "q", "answers": []}'], r"q.jsonl:1: 'answers' must be a non-empty list"),
        (
            ['{"id": "a", "question": "q", "answers": ["x"]}', '{"id": "a", "question": "r", "answers": ["y"]}'],
            r"q.jsonl:2: duplicate id 'a' \(first seen on line 1\)",
        ),
        (['{"id": "a", "question": "q", "answers": ["x"], "split": "dev"}'], r"split 'dev' is not one of"),
        (["[1, 2]"], r"q.jsonl:1: expected a JSON object"),
        ([""], r"is empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "q.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_questions(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
