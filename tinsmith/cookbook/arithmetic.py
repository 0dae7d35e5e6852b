"""Arithmetic word problems, made here from a seed, and a grader for `\\boxed{}` answers.

The cookbook's math RL needs a task with checkable answers and no downloads: this module
writes small word problems ("Tom has 3 apples and buys 4 more. How many apples does Tom
have now?") from templates, each with an integer answer. The same (n, seed, difficulty)
always gives the same problems.

Reward (`grade`):

    reward = 1.0 * correct + 0.1 * formatted

- formatted: the response contains a complete `\\boxed{...}`;
- correct: the last boxed content is a number equal to the answer, ignoring spaces,
  thousands commas and a leading "+" ("\\boxed{1,024}" and "\\boxed{ +7 }" count).

So a correct boxed answer scores 1.1, a wrong or non-numeric boxed answer 0.1, and a
response with no `\\boxed{}` 0.0 (even if the right number appears in it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FORMAT_BONUS",
    "SYSTEM_PROMPT",
    "ArithmeticEnv",
    "Difficulty",
    "Problem",
    "extract_boxed",
    "grade",
    "make_problems",
    "parse_number",
    "problem_messages",
]

SYSTEM_PROMPT = (
    "Solve the math word problem. Think step by step, then give the final answer, "
    "a single whole number, inside \\boxed{}, for example \\boxed{42}."
)
# One worked example, for prompts that show the model the expected answer format.
FEWSHOT_QUESTION = "Lily has 2 pens and buys 5 more. How many pens does Lily have now?"
FEWSHOT_ANSWER = "Lily starts with 2 pens and buys 5 more: 2 + 5 = 7. The answer is \\boxed{7}."
FORMAT_BONUS = 0.1

Difficulty = Literal["easy", "medium", "hard"]

# Operand order per operation, and the answer it gives:
# add (a, b) -> a + b; subtract (a, b) -> a - b; multiply (a, b) -> a * b;
# multiply_add (a, b, c) -> a * b + c.
_TEMPLATES: dict[str, list[str]] = {
    "add": [
        "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        ("There are {a} {item} in a basket. {name} puts in {b} more. "
         "How many {item} are in the basket?"),
        ("{name} found {a} {item} on Monday and {b} {item} on Tuesday. "
         "How many {item} did {name} find in all?"),
    ],
    "subtract": [
        ("{name} has {a} {item} and gives {b} of them to a friend. "
         "How many {item} does {name} have left?"),
        ("A shelf holds {a} {item}. {name} takes {b} of them away. "
         "How many {item} are still on the shelf?"),
    ],
    "multiply": [
        "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
        ("Each box holds {b} {item}. {name} fills {a} boxes. "
         "How many {item} are in the boxes altogether?"),
    ],
    "multiply_add": [
        ("{name} has {c} {item} and buys {a} packs with {b} {item} in each pack. "
         "How many {item} does {name} have now?"),
    ],
}
_NAMES = ["Tom", "Lily", "Sam", "Maya", "Omar", "Ana", "Ben", "Zoe", "Ravi", "Nina"]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins"]

# difficulty -> operation -> inclusive (low, high) range of each operand. "subtract" lists
# only a: its b is drawn from 1..a-1, so answers stay positive.
_RANGES: dict[str, dict[str, list[tuple[int, int]]]] = {
    "easy": {"add": [(1, 10), (1, 10)], "subtract": [(2, 10)]},
    "medium": {
        "add": [(10, 99), (10, 99)],
        "subtract": [(20, 99)],
        "multiply": [(2, 9), (2, 9)],
    },
    "hard": {
        "add": [(100, 999), (100, 999)],
        "subtract": [(100, 999)],
        "multiply": [(2, 12), (10, 30)],
        "multiply_add": [(2, 12), (2, 12), (1, 50)],
    },
}


@dataclass(frozen=True)
class Problem:
    """One word problem: its text, integer answer, and how the answer was computed."""

    question: str
    answer: int
    operation: str  # a key of the operand-order table above
    operands: tuple[int, ...]


def _answer(operation: str, ops: tuple[int, ...]) -> int:
    if operation == "add":
        return ops[0] + ops[1]
    if operation == "subtract":
        return ops[0] - ops[1]
    if operation == "multiply":
        return ops[0] * ops[1]
    return ops[0] * ops[1] + ops[2]  # multiply_add


def make_problems(n: int, seed: int, difficulty: Difficulty = "easy") -> list[Problem]:
    """`n` problems drawn from `seed`; the same arguments always give the same problems."""
    if difficulty not in _RANGES:
        raise ValueError(f"difficulty must be one of {sorted(_RANGES)}, got {difficulty!r}")
    rng = random.Random(seed)
    ranges = _RANGES[difficulty]
    operations = sorted(ranges)  # sorted: the draw must not depend on dict order
    problems = []
    for _ in range(n):
        operation = rng.choice(operations)
        ops = [rng.randint(lo, hi) for lo, hi in ranges[operation]]
        if operation == "subtract":
            ops.append(rng.randint(1, ops[0] - 1))
        a, b, *rest = ops
        question = rng.choice(_TEMPLATES[operation]).format(
            name=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b, c=rest[0] if rest else ""
        )
        problems.append(Problem(question, _answer(operation, tuple(ops)), operation, tuple(ops)))
    return problems


def problem_messages(problem: Problem, fewshot: bool = False) -> list[dict[str, str]]:
    """The chat prompt for `problem`: the system prompt, an optional worked example, the question."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if fewshot:
        messages += [{"role": "user", "content": FEWSHOT_QUESTION},
                     {"role": "assistant", "content": FEWSHOT_ANSWER}]
    return [*messages, {"role": "user", "content": problem.question}]


_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` in `text`, or None.

    Braces inside are matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. A box nested
    in another belongs to the outer one's content; an unclosed `\\boxed{` is ignored.
    """
    last = None
    pos = 0
    while (m := _BOXED.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unclosed: look for a later box after this one's opening brace
            pos = m.end()
            continue
        last = text[m.end() : i - 1]
        pos = i
    return last


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """`text` as a number, ignoring whitespace, commas, LaTeX thin spaces and a leading "+"."""
    s = re.sub(r"\s|,|\\[,!; ]|\$", "", text).removeprefix("+")
    return float(s) if _NUMBER.fullmatch(s) else None


def grade(response_text: str, answer: int) -> tuple[float, dict[str, float]]:
    """(reward, metrics) of a response: 1.0 if its boxed answer equals `answer`, plus 0.1
    when it has a `\\boxed{}` at all (see the module docstring)."""
    boxed = extract_boxed(response_text)
    formatted = boxed is not None
    value = parse_number(boxed) if boxed is not None else None
    correct = value is not None and value == answer
    reward = float(correct) + FORMAT_BONUS * float(formatted)
    return reward, {"correct": float(correct), "format": float(formatted)}


@dataclass(frozen=True)
class ArithmeticEnv:
    """A single-step RL environment (`tinsmith.cookbook.datasets.Env`) for one problem."""

    problem: Problem
    fewshot: bool = False

    def initial_prompt(self) -> list[dict[str, str]]:
        return problem_messages(self.problem, self.fewshot)

    def reward(self, response_text: str) -> tuple[float, dict[str, float]]:
        return grade(response_text, self.problem.answer)
