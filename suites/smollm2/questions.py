"""The real chat model's question set: natural-language questions in seven families.

SmolLM2-135M-Instruct answers some of them best at once (facts it knows), some better
after a short chain of thought (arithmetic), and some no better either way (questions it
does not know). The families, and what reasoning is expected to do on them:

- ``add``: one- and two-digit addition, stated plainly (reasoning helps);
- ``word``: a sum or difference inside a short story (reasoning helps);
- ``subtract``: subtraction of small numbers (reasoning helps a little);
- ``capital``: the capital of a well-known country (reasoning hurts: the model drifts);
- ``opposite``: the opposite of a common word (reasoning hurts or does nothing);
- ``legs``: how many legs an animal has (reasoning does nothing);
- ``compare``: the larger of two numbers (little to gain).

Run ``python suites/smollm2/questions.py`` to rewrite ``questions.jsonl`` (seeded, so the
file is the same every time). Each line carries its split: 50% train, 20% val and 30% test
within each family, so every split has every family and the test split is large enough to
read a difference between controllers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("questions.jsonl")
SEED = 0
PER_FAMILY = 64

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "England": "London",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Turkey": "Ankara",
    "India": "New Delhi",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "day": "night",
    "happy": "sad",
    "old": "young",
    "open": "closed",
    "light": "dark",
    "hard": "soft",
    "wet": "dry",
    "full": "empty",
    "early": "late",
    "rich": "poor",
    "strong": "weak",
    "tall": "short",
    "good": "bad",
    "in": "out",
    "left": "right",
    "black": "white",
    "win": "lose",
    "yes": "no",
    "true": "false",
    "high": "low",
    "near": "far",
    "thick": "thin",
    "clean": "dirty",
    "loud": "quiet",
    "heavy": "light",
    "love": "hate",
}
LEGS = {
    "dog": 4,
    "cat": 4,
    "spider": 8,
    "bird": 2,
    "ant": 6,
    "cow": 4,
    "horse": 4,
    "chicken": 2,
    "duck": 2,
    "bee": 6,
    "fly": 6,
    "octopus": 8,
    "snake": 0,
    "fish": 0,
    "human": 2,
    "lion": 4,
    "elephant": 4,
    "beetle": 6,
    "frog": 4,
    "pig": 4,
    "goat": 4,
    "sheep": 4,
    "owl": 2,
    "penguin": 2,
}
NAMES = ["Sam", "Anna", "Tom", "Lucy", "Ben", "Mia", "Jack", "Emma", "Leo", "Zoe"]
THINGS = ["apples", "books", "coins", "pens", "marbles", "cookies", "stickers", "balls"]
WORDS = {0: "zero", 2: "two", 4: "four", 6: "six", 8: "eight"}


def _add(rng: random.Random) -> tuple[str, list[str]]:
    a, b = rng.randint(2, 19), rng.randint(2, 9)
    return f"What is {a} plus {b}?", [str(a + b)]


def _subtract(rng: random.Random) -> tuple[str, list[str]]:
    a = rng.randint(6, 20)
    b = rng.randint(1, a - 1)
    return f"What is {a} minus {b}?", [str(a - b)]


def _word(rng: random.Random) -> tuple[str, list[str]]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(3, 12), rng.randint(2, 9)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", [str(a + b)]
    a = a + b
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", [str(a - b)]


def _capital(rng: random.Random) -> tuple[str, list[str]]:
    country = rng.choice(sorted(CAPITALS))
    phrasing = rng.choice(
        ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."]
    )
    return phrasing.format(c=country), [CAPITALS[country]]


def _opposite(rng: random.Random) -> tuple[str, list[str]]:
    word = rng.choice(sorted(OPPOSITES))
    phrasing = rng.choice(["What is the opposite of {w}?", "What word means the opposite of {w}?"])
    return phrasing.format(w=f'"{word}"' if rng.random() < 0.5 else word), [OPPOSITES[word]]


def _legs(rng: random.Random) -> tuple[str, list[str]]:
    animal = rng.choice(sorted(LEGS))
    legs = LEGS[animal]
    answers = [str(legs)] + ([WORDS[legs]] if legs in WORDS else [])
    phrasing = rng.choice(
        ["How many legs does a {a} have?", "A {a} has how many legs?", "How many legs has a {a} got?"]
    )
    return phrasing.format(a=animal), answers


def _compare(rng: random.Random) -> tuple[str, list[str]]:
    a, b = rng.sample(range(2, 99), 2)
    return f"Which number is larger, {a} or {b}?", [str(max(a, b))]


FAMILIES = {
    "add": _add,
    "word": _word,
    "subtract": _subtract,
    "capital": _capital,
    "opposite": _opposite,
    "legs": _legs,
    "compare": _compare,
}


def questions(per_family: int = PER_FAMILY, seed: int = SEED) -> list[dict[str, object]]:
    """Every question of the set, family by family, with its split (50/20/30 within a family)."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for family, make in FAMILIES.items():
        seen: set[str] = set()
        made: list[tuple[str, list[str]]] = []
        for _ in range(per_family * 50):
            question, answers = make(rng)
            if question not in seen:
                seen.add(question)
                made.append((question, answers))
            if len(made) == per_family:
                break
        for i, (question, answers) in enumerate(made):
            split = "train" if i < len(made) * 0.5 else "val" if i < len(made) * 0.7 else "test"
            rows.append(
                {"id": f"{family}-{i:03d}", "question": question, "answers": answers, "family": family, "split": split}
            )
    return rows


def main() -> None:
    """Write questions.jsonl."""
    rows = questions()
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} questions to {OUT}")


if __name__ == "__main__":
    main()
