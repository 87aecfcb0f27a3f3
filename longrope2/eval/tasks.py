"""Generated retrieval tasks: passkey retrieval and needle-in-a-haystack at a depth. RULER's
tasks live in ``eval/ruler.py`` (its data files, prompts, scoring) and ``eval/ruler_gen.py``.

Every sample is built offline, in tokens, from the embedded books (haystack text) and a
per-sample seed, so a sample depends only on ``(seed, task, length, index, depth)`` and never on
which other samples were built before it (a resumed eval rebuilds the same ones). A sample's
prompt plus ``max_new_tokens`` fills ``length`` tokens exactly; the needle sits at
``round(depth * haystack_tokens)`` of the haystack (moved to the nearest sentence end within 2%).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from longrope2.data import needle as needle_template

Encode = Callable[[str], list[int]]

NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

MAX_NEW_TOKENS = {"passkey": 10, "needle": 12}


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    """Token budget: ``len(prompt) + max_new_tokens <= length``."""
    index: int
    prompt: list[int]
    references: list[str]
    metric: str
    """``exact``, ``all`` (string_match_all) or ``part`` (string_match_part)."""
    max_new_tokens: int
    depth: float | None = None
    needle_positions: tuple[int, ...] = ()
    """Prompt indices where the inserted needles start."""
    meta: dict = field(default_factory=dict)


class Corpus:
    """The books, tokenized lazily, as haystack source and word list."""

    def __init__(self, encode: Encode, books: Sequence[tuple[str, str]], bos_token_id: int | None = None):
        if not books:
            raise ValueError("no books to build haystacks from")
        self.encode, self.books, self.bos_token_id = encode, list(books), bos_token_id
        self._tokens: dict[int, list[int]] = {}

    def book_tokens(self, index: int) -> list[int]:
        index %= len(self.books)
        if index not in self._tokens:
            self._tokens[index] = self.encode(self.books[index][1])
        return self._tokens[index]

    def text_tokens(self, n: int, rng: np.random.Generator, book: int | None = None) -> list[int]:
        """``n`` consecutive tokens of one book from a random offset (books shorter than ``n``
        continue into the following ones)."""
        book = int(rng.integers(len(self.books))) if book is None else book
        tokens, following = self.book_tokens(book), 1
        while len(tokens) < n and following < len(self.books):
            tokens = tokens + self.book_tokens(book + following)
            following += 1
        if len(tokens) < n:
            raise ValueError(f"the books hold {len(tokens)} tokens; {n} are needed")
        start = int(rng.integers(0, len(tokens) - n + 1))
        return list(tokens[start:start + n])

    @cached_property
    def sentence_ends(self) -> frozenset[int]:
        """Ids of a period token (as the tokenizer splits "blue." and "blue. The")."""
        return frozenset(self.encode("blue.")[-1:] + self.encode("blue. The")[-2:-1])

    @cached_property
    def noise_tokens(self) -> list[int]:
        return self.encode(NOISE)

    def noise(self, n: int) -> list[int]:
        unit = self.noise_tokens
        return (unit * (n // len(unit) + 1))[:n]


def sample_rng(seed: int, task: str, length: int, index: int, depth: float | None = None) -> np.random.Generator:
    depth_key = -1 if depth is None else int(round(depth * 10_000))
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index, depth_key + 1])


def assemble(head: list[int], inserts: Sequence[tuple[float, list[int]]], tail: list[int],
             haystack: Callable[[int], list[int]], budget: int,
             sentence_ends: frozenset[int] = frozenset()) -> tuple[list[int], tuple[int, ...]]:
    """``head + haystack with inserts at their depths + tail``, exactly ``budget`` tokens; returns
    the tokens and where each insert starts (in the order given). An insert goes right after the
    nearest haystack token in ``sentence_ends`` (a period) within 2% of the haystack, else at
    exactly ``round(depth * haystack_tokens)``."""
    fixed = len(head) + len(tail) + sum(len(t) for _, t in inserts)
    filler = budget - fixed
    if filler < 1:
        raise ValueError(f"a budget of {budget} tokens is too short for this template ({fixed} tokens)")
    hay = haystack(filler)
    assert len(hay) == filler
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    tokens, positions, previous = list(head), [0] * len(inserts), 0
    for i in order:
        depth, insert = inserts[i]
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        cut = _snap(hay, int(round(depth * filler)), sentence_ends, previous, filler // 50)
        tokens += hay[previous:cut]
        positions[i] = len(tokens)
        tokens += insert
        previous = cut
    tokens += hay[previous:] + tail
    assert len(tokens) == budget
    return tokens, tuple(positions)


class TaskBuilder:
    """Builds the samples of every task from one corpus and seed."""

    def __init__(self, corpus: Corpus, seed: int = 0, max_new_tokens: dict[str, int] | None = None):
        self.corpus, self.seed = corpus, seed
        self.max_new_tokens = {**MAX_NEW_TOKENS, **(max_new_tokens or {})}

    @property
    def encode(self) -> Encode:
        return self.corpus.encode

    def _head(self, text: str) -> list[int]:
        bos = self.corpus.bos_token_id
        return ([bos] if bos is not None else []) + self.encode(text)

    def build(self, task: str, length: int, index: int, depth: float | None = None) -> Sample:
        try:
            make = getattr(self, f"_{task}")
        except AttributeError:
            raise ValueError(f"unknown task {task!r}; known: passkey, needle (RULER's tasks: eval/ruler.py)") from None
        rng = sample_rng(self.seed, task, length, index, depth)
        new = self.max_new_tokens[task]
        if length <= new:
            raise ValueError(f"{task}: length {length} leaves no room for a prompt and {new} new tokens")
        try:
            return make(rng, length, index, depth, length - new, new)
        except ValueError as error:
            raise ValueError(f"{task} at {length} tokens: {error}") from None

    # --- retrieval ---------------------------------------------------------------------------
    def _passkey(self, rng, length, index, depth, budget, new) -> Sample:
        depth = float(rng.uniform()) if depth is None else depth
        key = str(int(rng.integers(10_000, 100_000)))
        needle = self.encode(PASSKEY_NEEDLE.format(key=key))
        tokens, at = assemble(self._head(PASSKEY_HEAD), [(depth, needle)], self.encode(PASSKEY_QUESTION),
                              self.corpus.noise, budget, self.corpus.sentence_ends)
        return Sample("passkey", length, index, tokens, [key], "exact", new, depth, at)

    def _needle(self, rng, length, index, depth, budget, new) -> Sample:
        """The needle-PPL template (data/needle.py) with the book haystack, answered by greedy decoding."""
        depth = float(rng.uniform()) if depth is None else depth
        key = _key(rng)
        value = str(int(rng.integers(1_000_000, 10_000_000)))
        needle = self.encode(needle_template.NEEDLE.format(key=key, value=value))
        question = self.encode(needle_template.QUESTION.format(key=key))
        tokens, at = assemble(self._head(needle_template.INSTRUCTION), [(depth, needle)], question,
                              lambda n: self.corpus.text_tokens(n, rng), budget,
                              self.corpus.sentence_ends)
        return Sample("needle", length, index, tokens, [value], "exact", new, depth, at, {"key": key})


def _snap(hay: list[int], cut: int, ends: frozenset[int], lowest: int, reach: int) -> int:
    if not ends or cut in (0, len(hay)):
        return cut
    for step in range(reach + 1):
        for j in (cut - step, cut + step):
            if lowest < j <= len(hay) and hay[j - 1] in ends:
                return j
    return cut


def _key(rng: np.random.Generator) -> str:
    adjectives, nouns = needle_template._ADJECTIVES, needle_template._NOUNS
    return f"{adjectives[int(rng.integers(len(adjectives)))]}-{nouns[int(rng.integers(len(nouns)))]}"


def needle_depths(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1."""
    return [0.0] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


__all__ = ["Corpus", "Sample", "TaskBuilder", "MAX_NEW_TOKENS", "assemble", "needle_depths", "sample_rng"]
