import pytest

from tokenopt.actions import build_action_table, parse_budgets, parse_mode, parse_modes


def test_action_table_order_and_names():
    table = build_action_table([0, 8], parse_modes("greedy,sc5"))
    assert [a.name for a in table] == ["b0/greedy", "b8/greedy", "b0/sc5", "b8/sc5"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,-4,8", "must be >= 0"),
        ("0,8,4", "not in increasing order"),
        ("0,4,4", "duplicates"),
        ("0,four", "not an integer"),
        ("", "empty"),
    ],
)
def test_bad_budget_lists_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budgets(text)


def test_modes():
    assert parse_mode("beam3").width == 3
    assert parse_mode("sc5").kind == "sc"
    with pytest.raises(ValueError, match="greedy, beam<k> or sc<k>"):
        parse_mode("nucleus")
    with pytest.raises(ValueError, match="k >= 2"):
        parse_mode("sc1")
    with pytest.raises(ValueError, match="more than once"):
        parse_modes("greedy,greedy")
