"""Tool-use environments: a question answered over several turns, with a tool to call.

Both are `tinsmith.cookbook.datasets.MultiStepEnv`s with the same protocol (`ToolEnv`): the
system prompt explains the tool. An assistant turn that holds a call, and no `\\boxed{}`
answer, gets one `tool` message in reply and the episode goes on; a turn with a `\\boxed{}`
answer, or with no call, is the final answer, and so is the `max_turns`-th turn whatever it
holds. Only a turn's first call counts. All the reward comes at the final turn:

    reward = grade(final text)      # 1.0 correct + 0.1 for a \\boxed{}
             + TOOL_BONUS (0.1)     # once, if the episode made at least one good call

- `CalculatorEnv`: arithmetic word problems (`tinsmith.cookbook.arithmetic`); a call is
  `<calc>EXPR</calc>` (numbers and + - * / ( ) only, evaluated by `calculate` with Python's
  `ast`, never `eval`); the reply is the value or `error: ...`; a good call evaluates.
- `SearchEnv`: questions about a made-up knowledge base (`tinsmith.cookbook.search_index`);
  a call is `<search>QUERY</search>`; the reply lists the top `k` documents by BM25 as
  `[id] text` lines (each text cut to MAX_DOC_CHARS), or `no results`, or `error: empty
  query`; a good call returns results. Graded by `search_index.grade_lookup` (numbers
  exactly, words ignoring case and spacing).

The metric `tool_calls` counts an episode's good calls.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from typing import ClassVar

from tinsmith.cookbook.arithmetic import Problem, extract_boxed, grade
from tinsmith.cookbook.search_index import LookupProblem, SearchIndex, grade_lookup

__all__ = ["TOOL_BONUS", "CalculatorEnv", "SearchEnv", "ToolEnv", "calculate", "expression",
           "find_call", "format_number"]

TOOL_BONUS = 0.1
MAX_EXPR_CHARS = 200
MAX_DOC_CHARS = 200
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expr: str) -> float:
    """The value of an arithmetic expression: numbers, + - * / and parentheses only.
    Anything else (names, calls, attributes, **, ...) raises ValueError."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"syntax error: {e.msg}") from None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not allowed: {type(node).__name__}")

    value = ev(tree.body)
    if not abs(value) < 1e18:
        raise ValueError("result too large")
    return value


_EXPRESSIONS = {"add": "{0} + {1}", "subtract": "{0} - {1}", "multiply": "{0} * {1}",
                "multiply_add": "{0} * {1} + {2}"}


def expression(problem: Problem) -> str:
    """The calculator expression that computes a word problem's answer."""
    return _EXPRESSIONS[problem.operation].format(*problem.operands)


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def find_call(text: str, tag: str = "calc") -> str | None:
    """The content of the first `<tag>...</tag>` in `text`, or None."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1) if m else None


@dataclass(kw_only=True)
class ToolEnv:
    """The shared protocol (module docstring); subclasses say what a call does and grade."""

    max_turns: int = 3
    fewshot: bool = True
    """Show one worked episode (`example`) before the question: a small model copies it."""
    turns: int = 0
    tool_calls: int = 0
    tag: ClassVar[str] = ""
    """A call is `<tag>ARGUMENT</tag>`."""
    system_prompt: ClassVar[str] = ""
    example: ClassVar[list[dict[str, str]]] = []

    def question(self) -> str:
        raise NotImplementedError

    def call(self, argument: str) -> tuple[str, bool]:
        """The tool's reply to a call with `argument`, and whether the call was a good one;
        ValueError for a bad argument."""
        raise NotImplementedError

    def reply(self, text: str) -> str | None:
        """The tool's reply to the first call in `text` (None: no call; `error: ...` for a
        bad one); counts good calls."""
        argument = find_call(text, self.tag)
        if argument is None:
            return None
        try:
            answer, good = self.call(argument)
        except ValueError as e:
            return f"error: {e}"
        if good:
            self.tool_calls += 1
        return answer

    def grade(self, text: str) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    def demo_call(self) -> tuple[str, str]:
        """(a good call for this question, the right answer): for scripted episodes."""
        raise NotImplementedError

    def demonstration(self) -> list[dict[str, str]]:
        """A scripted, correct episode: the initial observation, one good call, the tool's
        own reply to it, and the right `\\boxed{}` answer. Supervised training on these
        before RL (a warm start) teaches a small model the protocol that RL then refines.
        Uses this environment's tool, so call it on an environment not used for an episode."""
        call, answer = self.demo_call()
        reply = self.reply(call)
        assert reply is not None
        return [*self.initial_observation(), {"role": "assistant", "content": call},
                {"role": "tool", "content": reply},
                {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."}]

    def initial_observation(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt},
                *(self.example if self.fewshot else []),
                {"role": "user", "content": self.question()}]

    def step(self, action_text: str) -> tuple[list[dict[str, str]] | None, float, bool,
                                              dict[str, float]]:
        self.turns += 1
        reply = self.reply(action_text) if extract_boxed(action_text) is None else None
        if reply is not None and self.turns < self.max_turns:
            return [{"role": "tool", "content": reply}], 0.0, False, {}
        reward, info = self.grade(action_text)
        reward += TOOL_BONUS * (self.tool_calls > 0)
        return None, reward, True, {**info, "tool_calls": float(self.tool_calls),
                                    "turns": float(self.turns)}


@dataclass
class CalculatorEnv(ToolEnv):
    """An arithmetic word problem with a calculator tool (module docstring)."""

    problem: Problem
    tag: ClassVar[str] = "calc"
    system_prompt: ClassVar[str] = (
        "Solve the math word problem. You may use a calculator: write <calc>EXPRESSION</calc> "
        "(numbers and + - * / ( ) only) and stop; the result comes back in a tool message. "
        "When you know the answer, give it as a single whole number inside \\boxed{}, "
        "for example \\boxed{42}.")
    example: ClassVar[list[dict[str, str]]] = [
        {"role": "user", "content": "A baker fills 12 trays with 8 rolls each. How many rolls "
                                    "does the baker make?"},
        {"role": "assistant", "content": "<calc>12 * 8</calc>"},
        {"role": "tool", "content": "96"},
        {"role": "assistant", "content": "The baker makes \\boxed{96} rolls."}]

    def question(self) -> str:
        return self.problem.question

    def call(self, argument: str) -> tuple[str, bool]:
        return format_number(calculate(argument)), True

    def grade(self, text: str) -> tuple[float, dict[str, float]]:
        return grade(text, self.problem.answer)

    def demo_call(self) -> tuple[str, str]:
        return f"<calc>{expression(self.problem)}</calc>", str(self.problem.answer)


@dataclass
class SearchEnv(ToolEnv):
    """A question about a made-up knowledge base, with a search tool (module docstring)."""

    problem: LookupProblem
    index: SearchIndex
    k: int = 3
    tag: ClassVar[str] = "search"
    system_prompt: ClassVar[str] = (
        "Answer the question about a fictional world; you cannot know the answer without "
        "looking it up. Search the knowledge base: write <search>QUERY</search> (a few "
        "keywords, for example <search>capital of Velmora</search>) and stop; the best "
        "matching documents come back in a tool message. "
        "When you know the answer, give it inside \\boxed{}: a single word or a whole "
        "number, for example \\boxed{Velmora} or \\boxed{1742}.")
    example: ClassVar[list[dict[str, str]]] = [
        {"role": "user", "content": "In what year was the painter Ysolde Marren born?"},
        {"role": "assistant", "content": "<search>painter Ysolde Marren born</search>"},
        {"role": "tool", "content": "[doc-900] The painter Ysolde Marren was born in 1788."},
        {"role": "assistant", "content": "Ysolde Marren was born in \\boxed{1788}."}]

    def question(self) -> str:
        return self.problem.question

    def call(self, argument: str) -> tuple[str, bool]:
        hits = self.index.search(argument, self.k)
        if not hits:
            return "no results", False
        return "\n".join(f"[{doc.id}] {_cut(doc.text)}" for doc, _ in hits), True

    def grade(self, text: str) -> tuple[float, dict[str, float]]:
        return grade_lookup(text, self.problem.answer)

    def demo_call(self) -> tuple[str, str]:
        return f"<search>{self.problem.question.rstrip('?')}</search>", self.problem.answer


def _cut(text: str) -> str:
    """`text` on one line, at most MAX_DOC_CHARS long (cut at a space, with "...")."""
    text = " ".join(text.split())
    if len(text) <= MAX_DOC_CHARS:
        return text
    return text[:MAX_DOC_CHARS - 3].rsplit(" ", 1)[0] + "..."
