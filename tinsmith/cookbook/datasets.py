"""Dataset loaders, splits, batching and the RL environment interfaces, in plain Python.

Everything returns lists of plain values (a message is a dict with "role" and "content"),
so recipes need no data library. File formats, one JSON object per line (blank lines are
skipped; a bad line raises `DatasetFormatError` naming the file and line number):

- conversations: {"messages": [{"role": "user", "content": "..."}, ...]}
- prompt/completion: {"prompt": "...", "completion": "..."} -> [user, assistant] messages
- preference pairs: {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}

A local Hugging Face `datasets` folder (`save_to_disk` output) loads with `load_hf_dataset`
when the optional `datasets` package is installed.

Splits and batches are deterministic functions of a seed (and epoch), so a resumed run
sees exactly the batches it would have seen.

RL environments are `typing.Protocol`s: any class with the right methods is one.
`Env` is single-step (one prompt, one sampled response, one reward), `MultiStepEnv` a
turn-by-turn episode that ends when `step` says `done`.
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

Message = dict[str, Any]  # {"role": str, "content": str, ...any other keys, kept as they are}
Conversation = list[Message]
T = TypeVar("T")


class DatasetFormatError(ValueError):
    """A data row (or file line) that is not valid JSON or not of the expected shape."""


def read_jsonl(path: str | PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def _messages(value: Any) -> Conversation:
    """Validate a list of {"role": str, "content": str} messages (or DatasetFormatError)."""
    if not isinstance(value, list) or not value:
        raise DatasetFormatError("'messages' must be a non-empty list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DatasetFormatError(f"message {i} needs a string 'role'")
        if not isinstance(m.get("content"), str):
            raise DatasetFormatError(f"message {i} needs a string 'content'")
    return [dict(m) for m in value]


def row_to_conversation(row: Mapping[str, Any]) -> Conversation:
    """A row with "messages", or with "prompt" and "completion", as a conversation."""
    if "messages" in row:
        return _messages(row["messages"])
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    raise DatasetFormatError("expected 'messages', or string 'prompt' and 'completion'")


def _load(path: str | PathLike[str], convert: Callable[[dict[str, Any]], T]) -> list[T]:
    out: list[T] = []
    for lineno, obj in read_jsonl(path):
        try:
            out.append(convert(obj))
        except DatasetFormatError as e:  # add where: file and line
            raise DatasetFormatError(f"{path}:{lineno}: {e}") from None
    return out


def load_conversations(path: str | PathLike[str]) -> list[Conversation]:
    """Conversations from JSONL; each line is a "messages" or a prompt/completion object."""
    return _load(path, row_to_conversation)


def load_prompt_completions(path: str | PathLike[str]) -> list[Conversation]:
    """Prompt/completion JSONL only, each line as a [user, assistant] conversation."""
    def convert(obj: dict[str, Any]) -> Conversation:
        if "messages" in obj:
            raise DatasetFormatError("expected 'prompt' and 'completion', found 'messages'")
        return row_to_conversation(obj)

    return _load(path, convert)


def load_hf_dataset(path: str | PathLike[str], split: str | None = "train") -> list[dict[str, Any]]:
    """Rows (dicts) of a Hugging Face dataset saved with `save_to_disk` at `path`.

    A DatasetDict folder picks `split`. Needs the optional `datasets` package; turn rows
    into conversations with `row_to_conversation`.
    """
    try:
        hf = importlib.import_module("datasets")  # the HF package, not this module
    except ImportError:
        raise ImportError(
            "loading a Hugging Face dataset folder needs the `datasets` package: "
            "pip install datasets (or use a JSONL file)"
        ) from None
    ds = hf.load_from_disk(str(path))
    if isinstance(ds, hf.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return [dict(row) for row in ds]


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the prompt (as messages) and the preferred / dispreferred replies."""

    prompt: Conversation
    chosen: str
    rejected: str

    def chosen_conversation(self) -> Conversation:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    def rejected_conversation(self) -> Conversation:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


def _preference(obj: dict[str, Any]) -> PreferencePair:
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        messages: Conversation = [{"role": "user", "content": prompt}]
    else:
        try:
            messages = _messages(prompt)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"'prompt' must be a string or a list of messages ({e})") from None
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            raise DatasetFormatError(f"'{key}' must be a string")
    return PreferencePair(prompt=messages, chosen=obj["chosen"], rejected=obj["rejected"])


def load_preference_pairs(path: str | PathLike[str]) -> list[PreferencePair]:
    """Preference pairs from JSONL: {"prompt": str | messages, "chosen": str, "rejected": str}."""
    return _load(path, _preference)


def train_test_split(items: Sequence[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `seed` and hold out round(len * test_fraction) items: (train, test)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = round(len(items) * test_fraction)
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


def batches(
    items: Sequence[T], batch_size: int, seed: int, epoch: int = 0, drop_last: bool = False
) -> list[list[T]]:
    """The batches of one epoch: `items` shuffled by (seed, epoch), cut into `batch_size`s.

    The same (seed, epoch) always gives the same batches, so a run resumed at batch k of
    an epoch can index this list. The last batch is shorter unless `drop_last`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(items)))
    # A string seed is hashed with SHA-512 by `random`: stable across processes and runs.
    random.Random(f"{seed}:{epoch}").shuffle(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [[items[i] for i in order[s : s + batch_size]] for s in range(0, stop, batch_size)]


# --- RL environments ---------------------------------------------------------------------


@runtime_checkable
class Env(Protocol):
    """A single-step RL environment: one prompt, one sampled response, one reward."""

    def initial_prompt(self) -> Conversation | str:
        """The prompt to sample from: messages (rendered with the chat template) or raw text."""
        ...

    def reward(self, response_text: str) -> tuple[float, dict[str, float]]:
        """(reward, metrics) of one sampled response; metrics are averaged into the logs."""
        ...


class StepResult(NamedTuple):
    """What `MultiStepEnv.step` returns; unpacks as (observation, reward, done, metrics)."""

    observation: Conversation | str | None  # the next turn's input; None when done
    reward: float
    done: bool
    metrics: dict[str, float]


@runtime_checkable
class MultiStepEnv(Protocol):
    """A multi-turn RL environment: observe, act, repeat until `done`.

    The policy samples an action for each observation; `step` takes the action's text and
    returns the next observation (new messages to append, or text), the reward for this
    step, whether the episode ended, and metrics. An episode's return is the sum of rewards.
    """

    def initial_observation(self) -> Conversation | str:
        ...

    def step(self, action_text: str) -> tuple[Conversation | str | None, float, bool, dict[str, float]]:
        ...
