"""The BM25 search index against a hand-written reference of the formula, the built-in
made-up knowledge base (retrieval, determinism), the lookup grader and the JSONL loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tinsmith.cookbook import search_index
from tinsmith.cookbook.datasets import DatasetFormatError
from tinsmith.cookbook.search_index import (
    Document,
    SearchIndex,
    grade_lookup,
    knowledge_base,
    load_documents,
    make_lookup_problems,
    tokenize,
)

CORPUS = [Document("a", "The cat sat on the mat."),
          Document("b", "A dog and a cat played; the dog won."),
          Document("c", "Velmora's lighthouse keeper is Orrin."),
          Document("d", "The mat was red, the cat was not, the dog was.")]


def reference_bm25(docs: list[Document], query: str, k1: float = 1.5,
                   b: float = 0.75) -> dict[str, float]:
    """BM25 written out term by term, straight from the module docstring's formula."""
    toks = {d.id: tokenize(d.text) for d in docs}
    avgdl = sum(len(t) for t in toks.values()) / len(docs)
    scores = dict.fromkeys(toks, 0.0)
    for term in set(tokenize(query)):
        df = sum(term in t for t in toks.values())
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for doc_id, t in toks.items():
            tf = t.count(term)
            scores[doc_id] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avgdl))
    return {doc_id: s for doc_id, s in scores.items() if s > 0}


def test_tokenize_lowercases_and_splits_on_non_alphanumerics() -> None:
    assert tokenize("Velmora's 1,204 Light-house_keeper!") == [
        "velmora", "s", "1", "204", "light", "house", "keeper"]
    assert tokenize(" ?! ") == []


@pytest.mark.parametrize("query", ["cat", "the dog", "mat cat dog", "Velmora keeper",
                                   "cat cat CAT", "was the"])
def test_bm25_scores_match_the_reference(query: str) -> None:
    index = SearchIndex(CORPUS)
    expected = reference_bm25(CORPUS, query)
    got = index.search(query, k=10)
    assert {d.id: s for d, s in got} == pytest.approx(expected, rel=1e-12)
    assert [s for _, s in got] == sorted(expected.values(), reverse=True)


def test_bm25_known_values_and_k() -> None:
    # "velmora" is in 1 of 4 docs: idf = ln(1 + 3.5 / 1.5); doc c has 6 tokens, avgdl 8.
    idf = math.log(1 + 3.5 / 1.5)
    expected = idf * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 6 / 8))
    [(doc, score)] = SearchIndex(CORPUS).search("VELMORA?", k=3)
    assert doc.id == "c" and score == pytest.approx(expected, rel=1e-12)
    assert [d.id for d, _ in SearchIndex(CORPUS).search("cat", k=2)] == ["a", "b"]  # d is longer
    assert SearchIndex(CORPUS).search("cat", k=0) == []
    assert SearchIndex(CORPUS).search("unicorn") == []


def test_ties_keep_document_order_and_bad_input_raises() -> None:
    docs = [Document(str(i), "same words here") for i in (3, 1, 2)]
    assert [d.id for d, _ in SearchIndex(docs).search("words", k=3)] == ["3", "1", "2"]
    with pytest.raises(ValueError, match="empty query"):
        SearchIndex(CORPUS).search("  ...  ")
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        SearchIndex([CORPUS[0], CORPUS[0]])
    with pytest.raises(ValueError, match="at least one document"):
        SearchIndex([])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_the_right_document_ranks_first_for_every_question(seed: int) -> None:
    docs = knowledge_base(seed)
    problems = make_lookup_problems(80, seed)
    assert len(docs) == 160 and len({d.id for d in docs}) == 160
    assert len({p.question for p in problems}) == 80
    index = SearchIndex(docs)
    by_id = {d.id: d for d in docs}
    hits = 0
    for p in problems:
        assert p.answer in by_id[p.doc_id].text and p.answer.isalnum()
        ranked = index.search(p.question, k=3)
        hits += ranked[0][0].id == p.doc_id
        # a distractor shares the question's entity, so retrieval is not trivial
        assert len(ranked) == 3
    assert hits / len(problems) == 1.0  # measured: recall@1 is 1.0 on seeds 0-19


def test_knowledge_base_and_problems_are_deterministic() -> None:
    first, problems = knowledge_base(7), make_lookup_problems(10, 7)
    search_index._world.cache_clear()  # really rebuild it
    assert knowledge_base(7) == first and make_lookup_problems(10, 7) == problems
    assert knowledge_base(8) != first and make_lookup_problems(10, 8) != problems
    assert make_lookup_problems(10, 7) == make_lookup_problems(20, 7)[:10]
    many = make_lookup_problems(200, 7)  # more than the 80 questions: repeats, all valid
    assert len(many) == 200 and len(set(many[:80])) == 80
    assert {p.doc_id for p in many} <= {d.id for d in first}


def test_grade_lookup() -> None:
    assert grade_lookup("\\boxed{ velmora }", "Velmora") == (1.1, {"correct": 1.0, "format": 1.0})
    assert grade_lookup("\\boxed{\\text{Velmora}.}", "Velmora")[0] == 1.1
    assert grade_lookup("\\boxed{Velmora Bay}", "Velmora")[0] == 0.1
    assert grade_lookup("Velmora", "Velmora") == (0.0, {"correct": 0.0, "format": 0.0})
    assert grade_lookup("\\boxed{1,742}", "1742")[0] == 1.1
    assert grade_lookup("\\boxed{1742.5}", "1742")[0] == 0.1


def test_load_documents(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "x", "text": "Orrin keeps the light."}\n\n{"id": 7, "text": "b"}\n')
    assert load_documents(path) == [Document("x", "Orrin keeps the light."), Document("7", "b")]
    for bad, why in [('{"id": "x", "text": "ok"}\n{"id": "y", "text": \n', "invalid JSON"),
                     ('{"id": "x", "text": "ok"}\n{"id": "y"}\n', "non-empty string 'text'"),
                     ('{"id": "x", "text": "ok"}\n{"id": [1], "text": "t"}\n', "'id'"),
                     ('{"id": "x", "text": "ok"}\n["not", "an", "object"]\n', "JSON object")]:
        path.write_text(bad)
        with pytest.raises(DatasetFormatError, match=f"corpus.jsonl:2: .*{why}"):
            load_documents(path)
    assert issubclass(DatasetFormatError, ValueError)
