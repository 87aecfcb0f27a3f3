"""Passkey and needle generators and the scorers: deterministic, within the token budget, needles
where asked; RULER's scoring and the intervals on hand examples."""

import pytest

from eval_fixtures import books, tokenizer
from longrope2.data import tokenize
from longrope2.eval.scoring import (average_interval, bootstrap_interval, exact_match, interval, postprocess, score, string_match_all,
                                    string_match_part, wilson_interval)
from longrope2.eval.tasks import MAX_NEW_TOKENS, Corpus, TaskBuilder, assemble

TASKS = ("passkey", "needle")
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
    assert len(sample.prompt) + sample.max_new_tokens == LENGTH  # the haystack fills the budget exactly
    text = decode(sample.prompt)
    for ref in sample.references:
        assert ref in text


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


def test_assemble_and_errors(builder):
    tokens, at = assemble([1, 2], [(0.5, [7, 7]), (0.0, [8])], [9], lambda n: list(range(100, 100 + n)), 13)
    assert tokens == [1, 2, 8, 100, 101, 102, 103, 7, 7, 104, 105, 106, 9] and at == (7, 2)  # cut at round(3.5) = 4
    with pytest.raises(ValueError, match="too short"):
        builder.build("needle", 60, 0)
    with pytest.raises(ValueError, match="unknown task"):
        builder.build("qa", LENGTH, 0)


def test_ruler_scoring_on_hand_examples():
    refs = ["1234567", "7654321", "Apple"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == pytest.approx(2 / 3)
    assert string_match_all("apple 1234567 7654321", refs) == 1.0  # case-insensitive
    assert string_match_part("only apple here", refs) == 1.0
    assert string_match_part("nothing", refs) == 0.0
    assert string_match_all("\x00 1234567\n", ["1234567"]) == 1.0
    # RULER's postprocess_pred: strip, control characters -> newlines, strip
    assert postprocess(" a\x01b\tc \n") == "a\nb\nc"
    assert string_match_part("New\x0bYork", ["new york"]) == 0.0  # not a space: RULER misses it too
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


def test_intervals():
    # Wilson 95% for 7/10 (textbook value: 0.3968-0.8922)
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    assert wilson_interval(0, 1) == (0.0, pytest.approx(0.7935, abs=1e-4))  # one sample says little
    assert interval([1.0, 0.0, 1.0]) == wilson_interval(2, 3)
    lo, hi = interval([0.5, 0.75, 1.0, 0.25] * 5)  # partial credit: a bootstrap around the mean
    assert lo < 0.625 < hi and hi - lo < 0.3
    # two tasks: the interval of the mean of the task means
    lo, hi = bootstrap_interval([[1.0] * 10, [0.0] * 10])
    assert lo == hi == 0.5
    assert average_interval([[1.0] * 10, [1.0] * 10]) == wilson_interval(20, 20)  # 100% is not certain
    lo, hi = average_interval([[1.0, 0.5] * 5, [0.0] * 10])
    assert lo < 0.375 < hi
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
