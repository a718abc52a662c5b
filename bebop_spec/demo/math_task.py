"""Synthetic multi-step arithmetic word problems: the demo's math domain and its RL task.

A problem is a start quantity followed by 1-4 operations (add, take away, buy packs, double or
triple, share equally). The solution shows one equation per step and ends with `#### <answer>`:

    Mia has 7 stickers. She buys 5 more. She gives 3 to Leo. How many stickers does Mia have now?

    Mia starts with 7 stickers.
    She buys 5 more: 7 + 5 = 12.
    She gives 3 to Leo: 12 - 3 = 9.
    #### 9

Difficulty grows with the number of steps and the size of the numbers (up to 5, 10 or 20), so
a small model gets the one-step single-digit problems right and most four-step ones wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = [
    ("Mia", "She"), ("Leo", "He"), ("Ana", "She"), ("Sam", "He"), ("Zoe", "She"),
    ("Ben", "He"), ("Ivy", "She"), ("Max", "He"), ("Lia", "She"), ("Tom", "He"),
    ("Eva", "She"), ("Noah", "He"), ("Ruby", "She"), ("Omar", "He"), ("Nina", "She"),
    ("Raj", "He"), ("Ella", "She"), ("Hugo", "He"), ("Maya", "She"), ("Finn", "He"),
]  # fmt: skip
ITEMS = [
    "apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "cards",
    "shells", "stamps", "balloons", "candies", "crayons", "eggs", "flowers", "toy cars",
    "beads", "buttons", "rocks", "oranges",
]  # fmt: skip
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets", "rows"]
# Difficulty levels: the largest number a problem starts from (and adds / takes away).
# Kept small: a 4M-parameter target memorises frequent arithmetic facts but does not learn
# the carry algorithm in a few minutes, so the number of distinct facts bounds accuracy.
NUMBER_CAPS = (5, 10, 20)
ANSWER_RE = re.compile(r"####\s*(-?\d+)(?!\.?\d)")  # an integer, not the start of 4.5


@dataclass
class _State:
    name: str
    pronoun: str
    item: str
    value: int
    question: list[str]
    solution: list[str]


def _add(s: _State, rng: random.Random, cap: int) -> None:
    b = rng.randint(1, cap)
    friend = rng.choice([n for n, _ in NAMES if n != s.name])
    verb, said = rng.choice(
        [
            (f"{s.pronoun} buys {b} more {s.item}.", f"{s.pronoun} buys {b} more"),
            (f"{s.pronoun} finds {b} more {s.item}.", f"{s.pronoun} finds {b} more"),
            (f"{friend} gives {s.name} {b} {s.item}.", f"{friend} gives {b}"),
        ]
    )
    s.question.append(verb)
    s.solution.append(f"{said}: {s.value} + {b} = {s.value + b}.")
    s.value += b


def _sub(s: _State, rng: random.Random, cap: int) -> None:
    b = rng.randint(1, min(cap, s.value))
    friend = rng.choice([n for n, _ in NAMES if n != s.name])
    verb, said = rng.choice(
        [
            (f"{s.pronoun} gives {b} {s.item} to {friend}.", f"{s.pronoun} gives {b} to {friend}"),
            (f"{s.pronoun} loses {b} {s.item}.", f"{s.pronoun} loses {b}"),
            (f"{s.pronoun} sells {b} {s.item}.", f"{s.pronoun} sells {b}"),
        ]
    )
    s.question.append(verb)
    s.solution.append(f"{said}: {s.value} - {b} = {s.value - b}.")
    s.value -= b


def _packs(s: _State, rng: random.Random, cap: int) -> None:
    k, b = rng.randint(2, 5), rng.randint(2, min(cap, 10))
    box = rng.choice(CONTAINERS)
    s.question.append(f"{s.pronoun} buys {k} {box} with {b} {s.item} in each.")
    s.solution.append(f"{k} {box} of {b}: {k} * {b} = {k * b}.")
    s.solution.append(f"{s.value} + {k * b} = {s.value + k * b}.")
    s.value += k * b


def _scale(s: _State, rng: random.Random, cap: int) -> None:
    k, word = rng.choice([(2, "doubles"), (3, "triples")])
    s.question.append(f"Then the number of {s.item} {word}.")
    s.solution.append(f"It {word}: {s.value} * {k} = {s.value * k}.")
    s.value *= k


OPERATIONS = (_add, _sub, _packs, _scale)


def _allowed(op, value: int) -> bool:
    # Nothing to take from an empty pile; keep products small enough to be learnable.
    return not (op is _sub and value == 0) and not (op is _scale and value > 30)


def _share(s: _State, rng: random.Random) -> str | None:
    """Final question that divides equally; None when the total has no small divisor."""
    divisors = [k for k in range(2, 7) if s.value % k == 0 and s.value // k >= 1]
    if not divisors:
        return None
    k = rng.choice(divisors)
    s.solution.append(f"Each of the {k} friends gets {s.value} / {k} = {s.value // k}.")
    s.value //= k
    return f"{s.pronoun} shares the {s.item} equally among {k} friends. How many {s.item} does each friend get?"


def make_math_problem(
    rng: random.Random, num_steps: int | None = None, level: int | None = None
) -> tuple[str, str, int]:
    """One problem -> (question, solution ending in '#### answer', answer)."""
    num_steps = rng.randint(1, 4) if num_steps is None else num_steps
    cap = NUMBER_CAPS[rng.randrange(len(NUMBER_CAPS)) if level is None else level]
    name, pronoun = rng.choice(NAMES)
    start = rng.randint(1, cap)
    item = rng.choice(ITEMS)
    s = _State(name, pronoun, item, start, [f"{name} has {start} {item}."],
               [f"{name} starts with {start} {item}."])  # fmt: skip
    final = None
    for i in range(num_steps):
        if i == num_steps - 1 and num_steps > 1 and rng.random() < 0.25:
            final = _share(s, rng)
            if final is not None:
                break
        ops = [op for op in OPERATIONS if _allowed(op, s.value)]
        rng.choice(ops)(s, rng, cap)
    if final is None:
        final = f"How many {item} does {name} have now?"
    s.solution.append(f"#### {s.value}")
    return " ".join([*s.question, final]), "\n".join(s.solution), s.value


def extract_answer(text: str) -> int | None:
    """The integer after the last '####', or None when the text has none."""
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def reward(text: str, answer: int) -> float:
    """1.0 when the completion's final answer equals `answer`, else 0.0 (RL reward)."""
    return 1.0 if extract_answer(text) == answer else 0.0
