"""Needle documents for needle-driven perplexity (LongRoPE2 paper, Sec. 3.3).

A document of exactly ``length`` tokens: the instruction, a needle sentence carrying a 7-digit
"special magic number" (near the start by default, or at a chosen depth of the book text),
book text as the haystack, the retrieval question, and the answer. Only the answer tokens are
scored, so the perplexity measures whether the model retrieves across the whole distance:

    A special magic number is hidden within the following text. Make sure to memorize it. I will
    quiz you about the number afterwards. One of the special magic numbers for numerous-kite is:
    6716097. <book> ... What is the special magic number for numerous-kite mentioned in the
    provided text? The special magic number for numerous-kite mentioned in the provided text is
    6716097
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = (
    " What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
ANSWER = " {value}"

# Keys in the paper's adjective-noun style ("numerous-kite").
_ADJECTIVES = ("numerous", "quiet", "amber", "brisk", "curious", "distant", "eager", "fragile", "gentle",
               "hollow", "jagged", "lively", "mellow", "nimble", "polite", "rustic", "silent", "tender",
               "vivid", "wistful")
_NOUNS = ("kite", "harbor", "lantern", "meadow", "orchard", "pebble", "quill", "ribbon", "saddle",
          "thistle", "violin", "walnut", "anchor", "beacon", "compass", "falcon", "glacier", "hammock",
          "island", "juniper")

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class NeedleDocument:
    tokens: list[int]
    """Exactly ``length`` token ids."""
    answer_start: int
    """Index of the first answer token; the answer runs to the end of the document."""
    key: str
    value: str
    depth: float
    """Where the needle sits in the haystack: 0 = right after the instruction, 1 = before the question."""
    source: str

    @property
    def length(self) -> int:
        return len(self.tokens)

    def inputs_and_labels(self) -> tuple[list[int], list[int], list[int]]:
        """Next-token form: ``(inputs, labels, loss_mask)``, each ``length - 1`` long, with the
        loss mask set exactly on the predictions of the answer tokens."""
        inputs, labels = self.tokens[:-1], self.tokens[1:]
        mask = [1 if i + 1 >= self.answer_start else 0 for i in range(len(inputs))]
        return inputs, labels, mask


def make_needle_document(
    encode: Encode,
    haystack_tokens: Sequence[int],
    length: int,
    rng: np.random.Generator,
    depth: float = 0.0,
    source: str = "",
    bos_token_id: int | None = None,
) -> NeedleDocument:
    """One needle document of exactly ``length`` tokens cut from ``haystack_tokens`` at a random
    offset. ``encode`` must not add special tokens; ``bos_token_id`` is prepended if given."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    key = f"{_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]}-{_NOUNS[int(rng.integers(len(_NOUNS)))]}"
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    head = ([bos_token_id] if bos_token_id is not None else []) + encode(INSTRUCTION)
    needle = encode(NEEDLE.format(key=key, value=value))
    question = encode(QUESTION.format(key=key))
    answer = encode(ANSWER.format(value=value))
    filler = length - len(head) - len(needle) - len(question) - len(answer)
    if filler < 1:
        raise ValueError(f"length {length} is too short for the needle template ({length - filler} tokens)")
    if len(haystack_tokens) < filler:
        raise ValueError(f"the haystack has {len(haystack_tokens)} tokens; a {length}-token document needs {filler}")
    start = int(rng.integers(0, len(haystack_tokens) - filler + 1))
    hay = list(haystack_tokens[start:start + filler])
    cut = int(round(depth * filler))
    tokens = head + hay[:cut] + needle + hay[cut:] + question + answer
    assert len(tokens) == length
    return NeedleDocument(tokens, length - len(answer), key, value, depth, source)


def make_needle_documents(
    encode: Encode,
    books: Sequence[tuple[str, str]],
    length: int,
    count: int,
    seed: int = 0,
    depths: Sequence[float] = (0.0,),
    bos_token_id: int | None = None,
) -> list[NeedleDocument]:
    """``count`` documents per depth, cycling over ``books`` (``(title, text)`` pairs); the
    paper uses 10 PG19 books with the needle near the start. Deterministic from ``seed``."""
    if not books:
        raise ValueError("no books to build needle documents from")
    rng = np.random.default_rng(seed)
    cache: dict[int, list[int]] = {}

    def tokens_of(index: int) -> list[int]:  # books are tokenized only when first used
        index %= len(books)
        if index not in cache:
            cache[index] = encode(books[index][1])
        return cache[index]

    documents = []
    for depth in depths:
        for i in range(count):
            tokens = tokens_of(i)
            # a book shorter than the document continues into the next books
            following = 1
            while len(tokens) < length and following < len(books):
                tokens = tokens + tokens_of(i + following)
                following += 1
            documents.append(make_needle_document(encode, tokens, length, rng, depth, books[i % len(books)][0],
                                                  bos_token_id))
    return documents


def needle_in_document(
    encode: Encode,
    document: Sequence[int],
    rng: np.random.Generator,
    bos_token_id: int | None = None,
) -> NeedleDocument | None:
    """``document`` (token ids, starting with ``bos_token_id`` if given) rewritten as a needle
    document of the same length: the instruction, the needle at a uniformly random depth of the
    document's own text, the question and the answer at the end. ``None`` when the document is
    too short to hold the template and some text. Mixed into a training corpus
    (``prepare-data --needle-fraction``), this gives a small model trained from scratch a
    retrieval skill within its window, which the base models of the paper have."""
    body = list(document[1:] if bos_token_id is not None and document and document[0] == bos_token_id else document)
    try:
        return make_needle_document(encode, body, len(document), rng, depth=float(rng.random()),
                                    bos_token_id=bos_token_id if len(body) < len(document) else None)
    except ValueError:  # shorter than the template plus one token of text
        return None
