"""Generated long-context tasks: passkey retrieval, needle-in-a-haystack at a depth, and
RULER-style synthetic tasks (Hsieh et al. 2024, ``NVIDIA/RULER scripts/data/synthetic``).

Every sample is built offline, in tokens, from the embedded books (haystack text and word
lists) and a per-sample seed, so a sample depends only on ``(seed, task, length, index, depth)``
and never on which other samples were built before it (a resumed eval rebuilds the same ones).
A sample's prompt plus ``max_new_tokens`` fits in ``length`` tokens (RULER's
``max_seq_length - tokens_to_generate``); the haystack fills the prompt exactly, the needles sit
at ``round(depth * haystack_tokens)`` of it.

RULER tasks kept here, with RULER's templates, needle phrasing and answer prefixes:
``niah_single`` (one needle, book haystack as RULER's essay haystack), ``niah_multikey`` (4
needles, one queried), ``niah_multivalue`` (4 values of one key, all wanted),
``niah_multiquery`` (4 keys queried), ``vt`` (variable tracking: one chain of 4 hops in the
"grass is green" noise), ``cwe`` (10 common words x 30 among uncommon words x 3 in a numbered
list) and ``fwe`` (Zipf(2) coded words; the top word is the dots noise, the next three are the
answer). Differences from RULER: keys are adjective-noun pairs from a fixed list instead of
``wonderwords``, CWE's words come from the embedded books, no in-context example is prepended,
and needles are inserted at token (not sentence) boundaries.
"""

from __future__ import annotations

import re
import string
import zlib
from collections import Counter
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

# RULER scripts/data/synthetic/constants.py (tokens_to_generate as RULER's defaults)
RULER_NIAH_HEAD = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the {type_v} afterwards.\n")
RULER_NIAH_NEEDLE = " One of the special magic {type_v} for {key} is: {value}."
RULER_NIAH_TAIL = ("\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
                   " The special magic {type_v} for {query} mentioned in the provided text are")
RULER_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
RULER_VT_TAIL = ("\nQuestion: Find all variables that are assigned the value {query} in the text above."
                 " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                 "are assgined the value {query}, they are: ")  # sic, RULER's spelling
RULER_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
                  "Memorize the ones that appear most often.\n")
RULER_CWE_TAIL = ("\nQuestion: What are the 10 most common words in the above list?"
                  " Answer: The top 10 words that appear most often in the list are:")
RULER_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. "
                  "Find the three most frequently appeared coded words. ")
RULER_FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                  "most frequently appeared words in the above coded text?"
                  " Answer: According to the coded text above, the three most frequently appeared words are:")

MAX_NEW_TOKENS = {"passkey": 10, "needle": 12, "niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128,
                  "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50}
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
RULER_DEPTHS = np.round(np.linspace(0, 1, num=40), 4)  # RULER inserts needles at 40 evenly spaced depths


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

    @cached_property
    def words(self) -> list[str]:
        """Ordinary lowercase words of the books (4-10 letters), most frequent first, without
        the 100 most frequent (function words)."""
        counts = Counter(w for _, text in self.books for w in re.findall(r"\b[a-z]{4,10}\b", text))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return ranked[100:3100]


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
            raise ValueError(f"unknown task {task!r}; known: passkey, needle, {', '.join(RULER_TASKS)}") from None
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

    # --- RULER NIAH --------------------------------------------------------------------------
    def _niah(self, task, rng, length, index, budget, new, keys: int, values: int, queries: int) -> Sample:
        names = _distinct_keys(rng, keys)
        table = {k: [str(int(rng.integers(1_000_000, 10_000_000))) for _ in range(values)] for k in names}
        needles = [(k, v) for k in names for v in table[k]]
        depths = sorted(rng.choice(RULER_DEPTHS, size=len(needles), replace=False).tolist())
        order = rng.permutation(len(needles))
        inserts = [(depths[i], self.encode(RULER_NIAH_NEEDLE.format(type_v="numbers", key=needles[j][0],
                                                                   value=needles[j][1])))
                   for i, j in enumerate(order)]
        queried = [names[int(i)] for i in rng.choice(keys, size=queries, replace=False)]
        query = queried[0] if queries == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
        tokens, at = assemble(self._head(RULER_NIAH_HEAD.format(type_v="numbers")), inserts,
                              self.encode(RULER_NIAH_TAIL.format(type_v="numbers", query=query)),
                              lambda n: self.corpus.text_tokens(n, rng), budget,
                              self.corpus.sentence_ends)
        references = [v for k in queried for v in table[k]]
        return Sample(task, length, index, tokens, references, "all", new, None, at, {"query": query})

    def _niah_single(self, rng, length, index, depth, budget, new) -> Sample:
        return self._niah("niah_single", rng, length, index, budget, new, 1, 1, 1)

    def _niah_multikey(self, rng, length, index, depth, budget, new) -> Sample:
        return self._niah("niah_multikey", rng, length, index, budget, new, 4, 1, 1)

    def _niah_multivalue(self, rng, length, index, depth, budget, new) -> Sample:
        return self._niah("niah_multivalue", rng, length, index, budget, new, 1, 4, 1)

    def _niah_multiquery(self, rng, length, index, depth, budget, new) -> Sample:
        return self._niah("niah_multiquery", rng, length, index, budget, new, 4, 1, 4)

    # --- RULER aggregation / tracing ---------------------------------------------------------
    def _vt(self, rng, length, index, depth, budget, new, hops: int = 4) -> Sample:
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(list(string.ascii_uppercase), size=5))
            if name not in names:
                names.append(name)
        value = str(int(rng.integers(10_000, 100_000)))
        chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[j + 1]} = VAR {names[j]}." for j in range(hops)]
        depths = sorted(rng.choice(RULER_DEPTHS, size=len(chain), replace=False).tolist())
        inserts = [(d, self.encode(text)) for d, text in zip(depths, chain)]  # in chain order
        tokens, at = assemble(self._head(RULER_VT_HEAD), inserts,
                              self.encode(RULER_VT_TAIL.format(query=value, num_v=hops + 1)),
                              self.corpus.noise, budget, self.corpus.sentence_ends)
        return Sample("vt", length, index, tokens, names, "all", new, None, at, {"value": value})

    def _cwe(self, rng, length, index, depth, budget, new, common: int = 10) -> Sample:
        vocabulary = self.corpus.words
        picked = [vocabulary[int(i)] for i in rng.permutation(len(vocabulary))]
        head, tail = self._head(RULER_CWE_HEAD), self.encode(RULER_CWE_TAIL)
        order_seed = int(rng.integers(2**31))

        def build(freq_common: int, uncommon: int, freq_uncommon: int = 3) -> list[int]:
            words = picked[:common] * freq_common + picked[common:common + uncommon] * freq_uncommon
            np.random.default_rng(order_seed).shuffle(words)
            return head + self.encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words))) + tail

        # RULER's frequencies (30 vs 3); a prompt too short for them keeps halving the common one
        freq_common = 30
        while len(build(freq_common, 0)) > budget:
            if freq_common <= 4:
                raise ValueError(f"cwe: a budget of {budget} tokens is too short for {common} common words")
            freq_common = max(4, freq_common // 2)
        most = _largest_fitting(lambda u: len(build(freq_common, u)) <= budget, len(picked) - common)
        tokens = build(freq_common, most)
        return Sample("cwe", length, index, tokens, picked[:common], "all", new, None, (),
                      {"freq_common": freq_common, "uncommon_words": most})

    def _fwe(self, rng, length, index, depth, budget, new, vocab_size: int = 2000, alpha: float = 2.0) -> Sample:
        vocab: list[str] = []
        seen = set()
        while len(vocab) < vocab_size:
            word = "".join(rng.choice(list(string.ascii_lowercase), size=6))
            if word not in seen:
                seen.add(word)
                vocab.append(word)
        vocab[0] = "...."  # RULER: the most frequent "word" is noise the question says to ignore
        head, tail = self._head(RULER_FWE_HEAD), self.encode(RULER_FWE_TAIL)
        order_seed = int(rng.integers(2**31))
        zeta = sum(k ** -alpha for k in range(1, 100_000)) + 1 / ((alpha - 1) * 100_000 ** (alpha - 1))

        def build(num_words: int) -> list[int]:
            counts = [int(num_words * k ** -alpha / zeta) for k in range(1, vocab_size + 1)]
            words = [w for w, c in zip(vocab, counts) for _ in range(c)]
            np.random.default_rng(order_seed).shuffle(words)
            return head + self.encode(" ".join(words)) + tail

        most = _largest_fitting(lambda n: len(build(n)) <= budget, budget)
        if int(most * 4 ** -alpha / zeta) <= int(most * 5 ** -alpha / zeta):
            raise ValueError(f"fwe: a budget of {budget} tokens is too short to rank the top words")
        return Sample("fwe", length, index, build(most), vocab[1:4], "all", new, None, (), {"words": most})


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


def _distinct_keys(rng: np.random.Generator, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def _largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in [0, upper] with ``fits(n)`` (monotone; ``fits(0)`` assumed)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def needle_depths(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1."""
    return [0.0] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


__all__ = ["Corpus", "Sample", "TaskBuilder", "RULER_TASKS", "MAX_NEW_TOKENS", "assemble", "needle_depths",
           "sample_rng"]
