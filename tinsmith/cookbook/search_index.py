"""A small BM25 search index, and a made-up knowledge base with questions to search it for.

`SearchIndex(documents).search(query, k)` ranks short documents with Okapi BM25:

    score(d, q) = sum over distinct terms t of q, present in d, of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))      (always > 0)

with N documents, df(t) of them containing t, |d| the document's length in tokens, avgdl
the mean length, k1 = 1.5 and b = 0.75. Tokens (`tokenize`): the text lowercased, split into
maximal runs of letters and digits; everything else separates ("Velmora's 1,204" gives
"velmora", "s", "1", "204"). A query term repeated counts once. Only documents sharing a
term with the query are returned, best first; equal scores keep the documents' order.

`knowledge_base(seed)` is a seeded, invented world the model cannot know from pretraining
(capitals of made-up countries, birth years of made-up people, heights of made-up
mountains, ...): one fact document per question plus a distractor that names the same
entity, under shuffled ids ("doc-000", ...). `make_lookup_problems(n, seed)` draws questions
about that world, each with a single-word or whole-number answer and the id of the document
that holds it; `grade_lookup` grades a `\\boxed{}` answer to one. The same seed always gives
the same documents and questions. `load_documents` reads a corpus of your own from JSONL
({"id": ..., "text": ...} per line).
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np

from tinsmith.cookbook.arithmetic import FORMAT_BONUS, extract_boxed, grade, parse_number
from tinsmith.cookbook.datasets import DatasetFormatError, _load

__all__ = ["Document", "LookupProblem", "SearchIndex", "grade_lookup", "knowledge_base",
           "load_documents", "make_lookup_problems", "tokenize"]

_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase `text` and split it into runs of letters and digits (module docstring)."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class LookupProblem:
    """A question about the knowledge base, its answer, and the document that holds it."""

    question: str
    answer: str
    doc_id: str


class SearchIndex:
    """Okapi BM25 over `documents` (module docstring). Ids must be unique."""

    def __init__(self, documents: Sequence[Document], k1: float = 1.5, b: float = 0.75):
        if not documents:
            raise ValueError("a search index needs at least one document")
        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise ValueError(f"duplicate document id {doc.id!r}")
            seen.add(doc.id)
        self.documents = list(documents)
        counts = [Counter(tokenize(d.text)) for d in self.documents]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        # term -> (indices of the documents holding it, their BM25 term weights)
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        by_term: dict[str, list[tuple[int, int]]] = {}
        for i, c in enumerate(counts):
            for term, tf in c.items():
                by_term.setdefault(term, []).append((i, tf))
        n = len(self.documents)
        for term, hits in by_term.items():
            idx = np.array([i for i, _ in hits])
            tf = np.array([t for _, t in hits], dtype=np.float64)
            idf = math.log(1 + (n - len(hits) + 0.5) / (len(hits) + 0.5))
            self._postings[term] = (idx, idf * tf * (k1 + 1) / (tf + norm[idx]))

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The (at most) `k` best (document, score) pairs for `query`, best first.
        An empty query (no letters or digits) raises ValueError."""
        terms = dict.fromkeys(tokenize(query))  # distinct, in order
        if not terms:
            raise ValueError("empty query")
        scores = np.zeros(len(self.documents))
        for term in terms:
            if term in self._postings:
                idx, weights = self._postings[term]
                scores[idx] += weights
        hits = np.flatnonzero(scores > 0)
        order = hits[np.lexsort((hits, -scores[hits]))][:max(k, 0)]  # ties: document order
        return [(self.documents[i], float(scores[i])) for i in order]


def load_documents(path: str | PathLike[str]) -> list[Document]:
    """Documents from JSONL, one {"id": str or int, "text": str} object per line; a bad
    line raises `DatasetFormatError` (a ValueError) naming the file and line."""
    def convert(obj: dict[str, Any]) -> Document:
        doc_id, text = obj.get("id"), obj.get("text")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise DatasetFormatError("expected a string or integer 'id'")
        if not isinstance(text, str) or not text.strip():
            raise DatasetFormatError("expected a non-empty string 'text'")
        return Document(str(doc_id), text)

    return _load(path, convert)


# --- the made-up knowledge base ------------------------------------------------------------

_SYLLABLES = ["vel", "mor", "zar", "qua", "lin", "thor", "bel", "ash", "kor", "ren", "dal",
              "mir", "tek", "bra", "nil", "ves", "gan", "sho", "pel", "tri", "dun", "fen",
              "lum", "ost", "yss", "cal", "bre", "hos"]
_PRODUCTS = ["copper", "wool", "salt", "amber", "tin", "silk", "honey", "glass"]
_JOBS = ["painter", "engineer", "poet", "astronomer", "cartographer", "composer"]
_PER_KIND = 16
# kind -> (fact, question, distractor); {e} the entity, {a} the answer, {o} another name.
_KINDS: dict[str, tuple[str, str, str]] = {
    "capital": ("The capital of {e} is the city of {a}.", "What is the capital of {e}?",
                "{e} is known for its {p} exports and its long winters."),
    "born": ("The {j} {e} was born in {a}.", "In what year was {e} born?",
             "{e} spent many years in {o} studying old maps."),
    "mountain": ("Mount {e} rises {a} metres above the sea.",
                 "How many metres high is Mount {e}?",
                 "Climbers reach Mount {e} from the village of {o}."),
    "keeper": ("The lighthouse keeper of {e} is named {a}.",
               "What is the name of the lighthouse keeper of {e}?",
               "The lighthouse of {e} was painted white after the storm."),
    "river": ("The {e} river is {a} kilometres long.", "How many kilometres long is the {e} river?",
              "Fishermen on the {e} river sell {p} at the market of {o}."),
}


@functools.lru_cache(maxsize=8)
def _world(seed: int) -> tuple[tuple[Document, ...], tuple[LookupProblem, ...]]:
    rng = random.Random(seed)
    used: set[str] = set()

    def name() -> str:
        while True:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title()
            if word not in used:
                used.add(word)
                return word

    answers = {"capital": name, "born": lambda: str(rng.randint(1520, 1890)),
               "mountain": lambda: str(rng.randint(1200, 6900)), "keeper": name,
               "river": lambda: str(rng.randint(40, 2400))}
    texts: list[tuple[str, str | None, str | None]] = []  # (text, question, answer)
    for kind in sorted(_KINDS):
        fact, question, distractor = _KINDS[kind]
        for _ in range(_PER_KIND):
            entity = f"{name()} {name()}" if kind == "born" else name()
            fill = {"e": entity, "a": answers[kind](), "o": name(),
                    "p": rng.choice(_PRODUCTS), "j": rng.choice(_JOBS)}
            texts.append((fact.format(**fill), question.format(**fill), fill["a"]))
            texts.append((distractor.format(**fill), None, None))
    rng.shuffle(texts)
    docs, problems = [], []
    for i, (text, question, answer) in enumerate(texts):
        docs.append(Document(f"doc-{i:03d}", text))
        if question is not None and answer is not None:
            problems.append(LookupProblem(question, answer, docs[-1].id))
    return tuple(docs), tuple(problems)


def knowledge_base(seed: int = 0) -> list[Document]:
    """The made-up world's documents for `seed` (160: a fact and a distractor per question)."""
    return list(_world(seed)[0])


def make_lookup_problems(n: int, seed: int = 0) -> list[LookupProblem]:
    """`n` questions about `knowledge_base(seed)`, drawn from `seed`: without repeats while
    they last (there are 80), then again in a fresh order."""
    pool = list(_world(seed)[1])
    rng = random.Random(seed + 1)
    out: list[LookupProblem] = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


def grade_lookup(response_text: str, answer: str) -> tuple[float, dict[str, float]]:
    """(reward, metrics) of a response to a lookup question: 1.0 if its last `\\boxed{}`
    holds the answer, plus 0.1 for having a `\\boxed{}` at all. A numeric answer is graded
    by `arithmetic.grade` (exact value); a word answer matches ignoring case, repeated
    whitespace, a `\\text{...}` wrapper and a trailing period."""
    number = parse_number(answer)
    if number is not None:
        return grade(response_text, number)  # type: ignore[arg-type]  # compared as a float
    boxed = extract_boxed(response_text)
    if boxed is None:
        return 0.0, {"correct": 0.0, "format": 0.0}
    text = re.sub(r"^\\text\s*\{(.*)\}$", r"\1", boxed.strip().rstrip(" ."), flags=re.DOTALL)
    correct = " ".join(text.rstrip(" .").split()).casefold() == " ".join(answer.split()).casefold()
    return float(correct) + FORMAT_BONUS, {"correct": float(correct), "format": 1.0}
