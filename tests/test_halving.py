"""Successive halving over needle documents (``search.halving``) as pure functions, driven by
per-document NLLs that this file makes up; the end-to-end search with halving is in
``test_search.py``."""

import math

import pytest

from longrope2.search.halving import HalvingConfig, needle_ppl, score_generation, stages, survivors


def test_stages_cover_every_document_once():
    assert stages(8, []) == [(0, 8)]
    assert stages(8, [1, 2, 4]) == [(0, 1), (1, 2), (2, 4), (4, 8)]


def test_needle_ppl_weights_documents_by_answer_tokens():
    assert needle_ppl([2.0, 6.0], [2, 2]) == pytest.approx(math.exp(2.0))
    assert needle_ppl([2.0], [2, 6]) == pytest.approx(math.exp(1.0))  # the documents reached only
    assert needle_ppl([math.inf, 1.0], [1, 1]) == math.inf


def test_the_rule_compares_with_the_kth_best_on_the_same_documents():
    counts = [1, 1, 1]
    partial = {"p1": [1.0, 0, 0], "p2": [2.0, 0, 0], "a": [1.5], "b": [2.05], "c": [2.2]}
    # k = 2 over {p1, p2, a, b, c} on document 0: 1.0, 1.5, 2.0, ... -> the 2nd best is e^1.5
    kept = survivors(["a", "b", "c"], partial, ["p1", "p2"], 1, counts, k=2, margin=math.exp(0.6) - 1)
    assert kept == ["a", "b"]  # c: e^2.2 > e^1.5 * e^0.6, b: e^2.05 <= e^2.1
    assert survivors(["a", "b", "c"], partial, ["p1", "p2"], 1, counts, k=2, margin=0.0) == ["a"]
    # no more than k in the pool: nobody can be outside the top-k
    assert survivors(["a", "c"], partial, [], 1, counts, k=2, margin=0.0) == ["a", "c"]


def test_score_generation_stops_hopeless_candidates_and_finishes_the_rest():
    """Document NLLs are a candidate's quality plus a document's difficulty: the bad
    candidates stop after the first document, the good ones are scored on all four, and the
    stages asked for exactly the documents each survivor still needed."""
    quality = {"good1": 1.0, "good2": 1.1, "bad1": 3.0, "bad2": 3.5}
    difficulty = [0.5, 0.0, 1.0, 0.2]
    asked = []

    def score_stage(alive, start, stop):
        asked.append((tuple(alive), start, stop))
        return [[quality[c] + d for d in difficulty[start:stop]] for c in alive]

    nll = score_generation(list(quality), [], {}, 4, [1, 1, 1, 1], HalvingConfig(rungs=[1, 2], margin=0.1), 2,
                           score_stage)
    assert asked == [(("good1", "good2", "bad1", "bad2"), 0, 1), (("good1", "good2"), 1, 2),
                     (("good1", "good2"), 2, 4)]
    assert {c: len(v) for c, v in nll.items()} == {"good1": 4, "good2": 4, "bad1": 1, "bad2": 1}
    assert nll["good1"] == [1.5, 1.0, 2.0, 1.2]


def test_without_rungs_every_candidate_gets_every_document():
    nll = score_generation(["a", "b"], [], {}, 3, [1, 1, 1], HalvingConfig(), 1,
                           lambda alive, start, stop: [[9.0] * (stop - start) for _ in alive])
    assert nll == {"a": [9.0] * 3, "b": [9.0] * 3}


def test_parents_set_the_bar():
    """With strong parents, a new candidate worse than the k-th parent on the first document
    stops there even though it is the best of its own generation."""
    partial = {"p1": [1.0, 1.0], "p2": [1.2, 1.2]}
    nll = score_generation(["new"], ["p1", "p2"], partial, 2, [1, 1], HalvingConfig(rungs=[1], margin=0.05), 2,
                           lambda alive, start, stop: [[2.0] * (stop - start) for _ in alive])
    assert nll == {"new": [2.0]}


@pytest.mark.parametrize("values, error", [({"rungs": [2, 2]}, "increasing"), ({"rungs": [0]}, ">= 1"),
                                           ({"margin": -0.1}, "margin")])
def test_bad_halving_configs_are_refused(values, error):
    with pytest.raises(ValueError, match=error):
        HalvingConfig(**values)


def test_a_rung_at_or_past_the_documents_is_refused():
    with pytest.raises(ValueError, match="below the 2 search documents"):
        HalvingConfig(rungs=[1, 2]).check(2)
