"""Corpora -> megatron indexed dataset (.bin/.idx): round trip through megatron's IndexedDataset."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from longrope2.data.indexed import check_indexed, cut_lengths, prepare_indexed, write_indexed
from longrope2.data.tokenize import hashed_words


def test_write_then_read_with_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n) for n in (1, 5, 300, 17)]
    stats = write_indexed(tmp_path / "d", docs, vocab_size=70000)  # > 65535: int32 storage
    data = IndexedDataset(str(tmp_path / "d"))
    assert len(data) == stats.documents == 4
    assert data.sequence_lengths.tolist() == [1, 5, 300, 17]
    for want, got in zip(docs, (data[i] for i in range(len(data)))):
        assert np.array_equal(want, got)
    assert data.index.dtype == np.int32
    assert not list(tmp_path.glob("*.tmp*")), "temporary files are renamed into place"


def test_prepare_text_and_jsonl(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    book = tmp_path / "book.txt"
    words = ["w" + "abcdefghij"[i % 10] + "klmnopqrst"[i // 10 % 10] for i in range(3000)]
    book.write_text(" ".join(words))
    records = tmp_path / "web.jsonl"
    records.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one two three", "four", ""])))
    tok = hashed_words(512)
    stats = prepare_indexed(tmp_path / "out", tok, 512, [book, records], min_doc_tokens=50, max_doc_tokens=400,
                            seed=3, progress=False)
    data = IndexedDataset(str(tmp_path / "out"))
    lengths = data.sequence_lengths.tolist()
    # the book is cut into log-uniform pieces that cover it exactly; records stay whole
    book_lengths = lengths[:-2]
    assert sum(book_lengths) == 3000 and max(book_lengths) <= 400 and min(book_lengths[:-1]) >= 50
    assert lengths[-2:] == [3, 1] and stats.documents == len(lengths)  # the empty record is dropped
    assert np.array_equal(np.concatenate([data[i] for i in range(len(book_lengths))]), tok.encode(" ".join(words)))
    assert data[len(lengths) - 2].tolist() == tok.encode("one two three")
    short, short_tokens, long, long_tokens = stats.short_long(200)
    assert short + long == stats.documents and short_tokens + long_tokens == stats.tokens == 3004
    assert short > 0 and long > 0


def test_cut_lengths_deterministic_and_bounded():
    a = cut_lengths(100_000, 64, 8192, random.Random(1))
    assert a == cut_lengths(100_000, 64, 8192, random.Random(1))
    assert sum(a) == 100_000 and max(a) <= 8192 and min(a[:-1]) >= 64


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare_indexed(tmp_path / "x", hashed_words(16), 16, [tmp_path / "nope.jsonl"], progress=False)
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        check_indexed([tmp_path / "absent"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match="no 'text' field"):
        prepare_indexed(tmp_path / "x", hashed_words(16), 16, [bad], progress=False)
