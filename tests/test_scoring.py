from hypothesis import given
from hypothesis import strategies as st

from tokenopt.scoring import exact_match, normalize_answer


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("an apple", ["Apple"])
    assert not exact_match("apples", ["apple"])


def test_numbers_compare_by_value():
    assert exact_match("3.0", ["3"])
    assert exact_match("+3", ["3"])
    assert exact_match("1,000", ["1000"])
    assert exact_match("0.50", ["0.5"])
    assert not exact_match("3.1", ["3"])


def test_any_gold_answer_counts():
    assert exact_match("paris", ["Lyon", "Paris"])
    assert not exact_match("", ["x"])


@given(st.text(max_size=30))
def test_normalisation_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once
