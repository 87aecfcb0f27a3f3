"""Needle documents: exact length, the paper's template, answer-only labels, depth, determinism."""

import pytest

from longrope2.data.needle import INSTRUCTION, make_needle_document, make_needle_documents

import numpy as np


def encode(text):  # byte-level: every character is a token, so positions are easy to check
    return list(text.encode())


def decode(tokens):
    return bytes(tokens).decode()


BOOKS = [("book-a", "It was a dark and stormy night. " * 400), ("book-b", "Call me Ishmael. " * 50)]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_document_follows_the_template(depth):
    doc = make_needle_document(encode, encode(BOOKS[0][1]), 2000, np.random.default_rng(0), depth=depth)
    text = decode(doc.tokens)
    assert len(doc.tokens) == 2000
    assert text.startswith(INSTRUCTION + " One of the special magic numbers for " if depth == 0 else INSTRUCTION)
    assert len(doc.value) == 7 and doc.value.isdigit()
    assert text.endswith(f"mentioned in the provided text is {doc.value}")
    assert decode(doc.tokens[doc.answer_start:]) == f" {doc.value}"
    needle = f" One of the special magic numbers for {doc.key} is: {doc.value}."
    needle_at = text.index(needle)
    filler = text.index(" What is the special magic number") - len(INSTRUCTION) - len(needle)
    assert abs((needle_at - len(INSTRUCTION)) / filler - depth) < 0.01


def test_labels_only_on_answer_tokens():
    doc = make_needle_document(encode, encode(BOOKS[0][1]), 500, np.random.default_rng(1))
    inputs, labels, mask = doc.inputs_and_labels()
    assert len(inputs) == len(labels) == len(mask) == 499
    scored = [label for label, m in zip(labels, mask) if m]
    assert decode(scored) == f" {doc.value}"
    assert sum(mask) == 8


def test_deterministic_and_cycles_books():
    a = make_needle_documents(encode, BOOKS, 1500, count=4, seed=7)
    b = make_needle_documents(encode, BOOKS, 1500, count=4, seed=7)
    c = make_needle_documents(encode, BOOKS, 1500, count=4, seed=8)
    assert [d.tokens for d in a] == [d.tokens for d in b]
    assert [d.tokens for d in a] != [d.tokens for d in c]
    assert [d.source for d in a] == ["book-a", "book-b", "book-a", "book-b"]
    assert len({d.value for d in a}) == 4
    # book-b alone is only 850 tokens: its documents continue into book-a
    assert all(len(d.tokens) == 1500 for d in a)


def test_errors_are_clear():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too short for the needle template"):
        make_needle_document(encode, encode(BOOKS[0][1]), 100, rng)
    with pytest.raises(ValueError, match="the haystack has 10 tokens"):
        make_needle_document(encode, list(range(10)), 1000, rng)
    with pytest.raises(ValueError, match="depth"):
        make_needle_document(encode, encode(BOOKS[0][1]), 1000, rng, depth=1.5)
    with pytest.raises(ValueError, match="no books"):
        make_needle_documents(encode, [], 1000, 1)
