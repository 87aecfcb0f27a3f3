"""Eval task generators and scorers: deterministic, within the token budget, needles where asked,
RULER's scoring on hand examples."""

import pytest

from eval_fixtures import books, tokenizer
from longrope2.data import tokenize
from longrope2.eval.scoring import exact_match, score, string_match_all, string_match_part
from longrope2.eval.tasks import MAX_NEW_TOKENS, RULER_TASKS, Corpus, TaskBuilder, assemble

TASKS = ("passkey", "needle", *RULER_TASKS)
LENGTH = 1536


@pytest.fixture(scope="module")
def builder():
    wrapped = tokenize.from_hf(tokenizer())
    return TaskBuilder(Corpus(wrapped.encode, list(books()), wrapped.bos_token_id), seed=3)


def decode(tokens):
    return tokenizer().decode(tokens)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_within_budget_with_answers_in_prompt(builder, task):
    sample = builder.build(task, LENGTH, 0)
    again = TaskBuilder(builder.corpus, seed=3).build(task, LENGTH, 0)
    other = builder.build(task, LENGTH, 1)
    assert sample.prompt == again.prompt and sample.references == again.references
    assert sample.prompt != other.prompt
    assert len(sample.prompt) + sample.max_new_tokens <= LENGTH
    assert sample.max_new_tokens == MAX_NEW_TOKENS[task]
    if task not in ("cwe", "fwe"):  # the needles fill the prompt exactly up to the budget
        assert len(sample.prompt) + sample.max_new_tokens == LENGTH
    text = decode(sample.prompt)
    for ref in sample.references:
        assert ref in text
    if task == "cwe":  # the 10 common words each appear more often than any other word
        items = [w.split(". ")[-1] for w in text.split("\n")[1].split(" ") if w and not w[0].isdigit()]
        counts = {w: items.count(w) for w in set(items)}
        top = sorted(counts, key=lambda w: -counts[w])[:10]
        assert set(top) == set(sample.references)
        assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)
    if task == "fwe":
        words = text.split("coded words. ")[1].split("\n")[0].split()
        ranked = sorted(set(words), key=lambda w: -words.count(w))
        assert ranked[0] == "...." and ranked[1:4] == sample.references


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_sits_at_the_requested_depth(builder, task, depth):
    sample = builder.build(task, LENGTH, 2, depth)
    assert sample.depth == depth
    (at,) = sample.needle_positions
    needle_text = decode(sample.prompt[at:at + 20])
    assert sample.references[0] in decode(sample.prompt[at:at + 45])
    assert needle_text.startswith((" The pass key is", " One of the special magic number"))
    head = 40 if task == "passkey" else 30  # instruction tokens before the haystack
    assert abs((at - head) / (LENGTH - MAX_NEW_TOKENS[task] - head - 60) - depth) < 0.05


def test_multi_needle_tasks_hold_every_needle(builder):
    multi = builder.build("niah_multivalue", LENGTH, 0)
    assert len(multi.references) == 4 and len(multi.needle_positions) == 4
    text = decode(multi.prompt)
    assert all(f"for {multi.meta['query']} is: {v}." in text for v in multi.references)
    query = builder.build("niah_multiquery", LENGTH, 0)
    assert query.meta["query"].count(", ") == 3 and ", and " in query.meta["query"]
    vt = builder.build("vt", LENGTH, 0)
    text = decode(vt.prompt)
    assert f"VAR {vt.references[0]} = {vt.meta['value']}." in text
    for a, b in zip(vt.references, vt.references[1:]):
        assert f"VAR {b} = VAR {a}." in text
    assert list(vt.needle_positions) == sorted(vt.needle_positions)  # the chain in order


def test_assemble_and_errors(builder):
    tokens, at = assemble([1, 2], [(0.5, [7, 7]), (0.0, [8])], [9], lambda n: list(range(100, 100 + n)), 13)
    assert tokens == [1, 2, 8, 100, 101, 102, 103, 7, 7, 104, 105, 106, 9] and at == (7, 2)  # cut at round(3.5) = 4
    with pytest.raises(ValueError, match="too short"):
        builder.build("niah_multikey", 300, 0)
    with pytest.raises(ValueError, match="unknown task"):
        builder.build("qa", LENGTH, 0)


def test_ruler_scoring_on_hand_examples():
    refs = ["1234567", "7654321", "Apple"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == pytest.approx(2 / 3)
    assert string_match_all("apple 1234567 7654321", refs) == 1.0  # case-insensitive
    assert string_match_part("only apple here", refs) == 1.0
    assert string_match_part("nothing", refs) == 0.0
    assert string_match_all("\x00 1234567\n", ["1234567"]) == 1.0
    # RULER's corpus-level score is 100 x the mean of these per-sample values
    samples = [("a b", ["a", "b"]), ("a", ["a", "b"]), ("", ["a"])]
    assert 100 * sum(string_match_all(p, r) for p, r in samples) / 3 == pytest.approx(50.0)


def test_exact_match():
    assert exact_match(" 48213.", ["48213"]) == 1.0
    assert exact_match("48213\nWhat", ["48213"]) == 1.0
    assert exact_match(" 482130", ["48213"]) == 0.0
    assert exact_match(" the key is 48213", ["48213"]) == 0.0
    assert exact_match("", ["48213"]) == 0.0
    assert score("exact", "48213", ["48213"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "x", ["x"])
