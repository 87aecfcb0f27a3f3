"""Corpora -> megatron-core indexed datasets (``.bin``/``.idx``), one document per record.

Sources, by file type:

* ``.txt``: one book per file; it is cut into documents (below);
* ``.jsonl`` / ``.json`` (one JSON object per line): the ``text`` field of each record is one
  document (RedPajama, Fineweb-Edu and most corpora ship this way);
* ``.parquet``: the ``text`` column, one document per row (needs ``pyarrow``);
* ``embedded:NAME``: one of the embedded books (``embedded:emma``), cut into documents;
* no paths: the embedded public-domain books (``longrope2.data.books``), cut into documents.

Books are long (60k-300k tokens), so they are cut into documents whose token lengths are drawn
log-uniformly between ``min_doc_tokens`` and ``max_doc_tokens`` (seeded), at paragraph-free
token boundaries. With an original window inside that range the result mixes short documents
(packed by the mixed-window sampler with the original RoPE) and long ones (rescaled RoPE).
JSONL/parquet records are kept whole (a record longer than ``max_doc_tokens`` is cut the same way).

The output is read back with megatron's ``IndexedDataset(prefix)``; ``dataset[i]`` is document
i's token ids, ``dataset.sequence_lengths`` their lengths.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from longrope2.data.tokenize import TextTokenizer

__all__ = ["PrepareStats", "iter_texts", "cut_lengths", "write_indexed", "prepare_indexed", "tokenizer_from_spec",
           "indexed_exists", "check_indexed"]


@dataclass
class PrepareStats:
    prefix: str
    documents: int = 0
    tokens: int = 0
    sources: int = 0
    needle_documents: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def short_long(self, window: int) -> tuple[int, int, int, int]:
        """(short docs, short tokens, long docs, long tokens) for an original window."""
        lengths = np.asarray(self.lengths)
        short = lengths <= window
        return int(short.sum()), int(lengths[short].sum()), int((~short).sum()), int(lengths[~short].sum())


def indexed_exists(prefix: str | os.PathLike) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def check_indexed(prefixes: Sequence[str | os.PathLike]) -> None:
    """Raise ``FileNotFoundError`` naming every dataset prefix whose ``.bin``/``.idx`` is missing."""
    missing = [str(p) for p in prefixes if not indexed_exists(p)]
    if missing:
        raise FileNotFoundError(
            "indexed dataset(s) not found (need PREFIX.bin and PREFIX.idx; build them with "
            "`longrope2 prepare-data`): " + ", ".join(missing)
        )


def tokenizer_from_spec(spec: str) -> tuple[TextTokenizer, int]:
    """``(tokenizer, vocab size)`` for ``hashed-words:VOCAB`` (random-weight models), ``smollm2``
    (the embedded GGUF's tokenizer), or an HF tokenizer folder / ``.gguf`` file."""
    from longrope2.data import tokenize

    if spec.startswith("hashed-words:"):
        vocab = spec.split(":", 1)[1]
        if not vocab.isdigit() or int(vocab) < 2:
            raise ValueError(f"tokenizer {spec!r}: hashed-words:VOCAB needs a vocabulary size >= 2 (e.g. hashed-words:512)")
        return tokenize.hashed_words(int(vocab)), int(vocab)
    from transformers import AutoTokenizer

    if spec == "smollm2":
        from longrope2.model.pretrained import smollm2_gguf_path

        path, name = smollm2_gguf_path(), "smollm2"
    else:
        path, name = Path(spec), Path(spec).stem
        if not path.exists():
            raise FileNotFoundError(f"tokenizer {spec!r}: not hashed-words:VOCAB, smollm2, or an existing path")
    if path.suffix == ".gguf":
        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        hf = AutoTokenizer.from_pretrained(path)
    return tokenize.from_hf(hf, name), len(hf)


# --- sources --------------------------------------------------------------------------------


SOURCE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def check_sources(paths: Sequence[str | os.PathLike]) -> None:
    """Every input exists and is readable by ``iter_texts``, before any tokenizing or writing."""
    from longrope2.data.books import EMBEDDED, embedded_book, is_embedded_spec

    for raw in paths:
        if is_embedded_spec(raw):
            embedded_book(raw[len(EMBEDDED):])
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {raw}: no such file or folder")
        if path.is_file() and path.suffix not in SOURCE_SUFFIXES:
            raise ValueError(f"input {path}: unsupported file type (use {', '.join(SOURCE_SUFFIXES)})")


def iter_texts(paths: Sequence[str | os.PathLike], text_field: str = "text") -> Iterator[tuple[str, str, bool]]:
    """``(source, text, is_book)`` for each record; books are cut into documents later."""
    from longrope2.data.books import EMBEDDED, embedded_book, is_embedded_spec

    for raw in paths:
        if is_embedded_spec(raw):  # embedded:NAME, one of the embedded books
            book = embedded_book(raw[len(EMBEDDED):])
            yield f"book:{book.title}", book.text, True
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            yield from iter_texts(sorted(p for p in path.iterdir() if p.suffix in SOURCE_SUFFIXES),
                                  text_field)
            continue
        if path.suffix == ".txt":
            from longrope2.data.books import load_text_files

            yield str(path), load_text_files(path)[0].text, True
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise ValueError(f"{path}:{line_no}: no {text_field!r} field (keys: {sorted(record)})")
                    yield f"{path}:{line_no}", record[text_field], False
        elif path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(path, columns=[text_field])
            for row, text in enumerate(table.column(text_field).to_pylist()):
                yield f"{path}:{row}", text, False
        else:
            raise ValueError(f"{path}: unsupported file type (use .txt, .jsonl, .json or .parquet)")


def cut_lengths(total: int, min_tokens: int, max_tokens: int, rng: random.Random) -> list[int]:
    """Split ``total`` tokens into pieces with log-uniform lengths in [min_tokens, max_tokens];
    the last piece keeps the remainder (it may be shorter than ``min_tokens``)."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_doc_tokens <= max_doc_tokens, got {min_tokens}, {max_tokens}")
    pieces, left = [], total
    lo, hi = math.log(min_tokens), math.log(max_tokens)
    while left > 0:
        n = min(left, int(round(math.exp(rng.uniform(lo, hi)))))
        pieces.append(n)
        left -= n
    return pieces


# --- writing --------------------------------------------------------------------------------


def write_indexed(prefix: str | os.PathLike, documents: Iterable[Sequence[int] | np.ndarray], vocab_size: int,
                  stats: PrepareStats | None = None) -> PrepareStats:
    """Write documents (token id sequences) to ``prefix.bin``/``prefix.idx`` atomically."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stats = stats or PrepareStats(str(prefix))
    dtype = DType.optimal_dtype(vocab_size)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    import torch

    for doc in documents:
        ids = np.asarray(doc, dtype=np.int64)
        if ids.size == 0:
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"token id out of range [0, {vocab_size}) in document {stats.documents}")
        builder.add_document(torch.from_numpy(ids.astype(dtype)), [ids.size])
        stats.documents += 1
        stats.tokens += int(ids.size)
        stats.lengths.append(int(ids.size))
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")  # last: a present .idx means a complete dataset
    return stats


def prepare_indexed(
    prefix: str | os.PathLike,
    tokenizer: TextTokenizer,
    vocab_size: int,
    paths: Sequence[str | os.PathLike] = (),
    min_doc_tokens: int = 64,
    max_doc_tokens: int = 32768,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
    needle_fraction: float = 0.0,
) -> PrepareStats:
    """Tokenize ``paths`` (default: the embedded books) into an indexed dataset at ``prefix``.

    ``needle_fraction``: that fraction of the documents (seeded) is rewritten as needle
    documents of the same length (``data.needle.needle_in_document``); counted in
    ``stats.needle_documents``."""
    from tqdm import tqdm

    from longrope2.data.books import is_embedded_spec
    from longrope2.data.needle import needle_in_document

    if not 0.0 <= needle_fraction <= 1.0:
        raise ValueError(f"needle_fraction must be in [0, 1], got {needle_fraction}")
    rng = random.Random(seed)
    needle_rng = np.random.default_rng([seed, 7])
    if paths:
        missing = [str(p) for p in paths if not is_embedded_spec(p) and not Path(p).expanduser().exists()]
        if missing:
            raise FileNotFoundError("data file(s) not found: " + ", ".join(missing))
        texts = iter_texts(paths, text_field)
    else:
        from longrope2.data.books import load_books

        texts = ((f"book:{b.title}", b.text, True) for b in load_books(progress=progress))
    stats = PrepareStats(str(prefix))

    def with_needles(document: list[int]) -> list[int]:
        if needle_fraction and needle_rng.random() < needle_fraction:
            needle = needle_in_document(tokenizer.encode, document, needle_rng, tokenizer.bos_token_id)
            if needle is not None:
                stats.needle_documents += 1
                return needle.tokens
        return document

    def documents() -> Iterator[list[int]]:
        bar = tqdm(texts, desc=f"tokenizing ({tokenizer.name})", unit=" records", disable=not progress,
                   file=sys.stderr)
        for source, text, is_book in bar:
            stats.sources += 1
            ids = tokenizer.encode(text)
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            if not is_book and len(ids) + len(bos) <= max_doc_tokens:
                yield with_needles(bos + ids)
                continue
            start = 0  # document lengths, BOS included, in [min_doc_tokens, max_doc_tokens]
            for n in cut_lengths(len(ids), max(1, min_doc_tokens - len(bos)), max_doc_tokens - len(bos), rng):
                yield with_needles(bos + ids[start:start + n])
                start += n
            bar.set_postfix(docs=stats.documents, tokens=stats.tokens)

    return write_indexed(prefix, documents(), vocab_size, stats)
