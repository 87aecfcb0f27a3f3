"""``longrope2 prepare-data``: corpora -> (optionally a trained tokenizer) -> an indexed dataset.

One ``PrepareConfig`` is one dataset; the command line and the pipeline's ``prepare`` stage both
build one and call ``run_prepare``. The dataset is ``PREFIX.bin/.idx`` (megatron-core's indexed
format, ``data/indexed.py``) plus ``PREFIX.json``, a manifest of what went in (sources,
tokenizer, document and token counts, needle documents, the config), written last.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longrope2 import configs


@dataclass(kw_only=True)
class PrepareConfig:
    output: str
    """Dataset prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.json."""
    tokenizer: str
    """``hashed-words:VOCAB``, ``smollm2``, or an HF tokenizer folder / ``.gguf``; with
    ``train_tokenizer`` the folder the trained tokenizer is written to (reused if present)."""
    inputs: list[str] = field(default_factory=list)
    """.txt books, .jsonl/.parquet records with ``text_field``, folders, ``embedded:NAME``
    (one embedded book); empty = all the embedded books."""
    train_tokenizer: int | None = None
    """Train a sentencepiece BPE tokenizer of this many pieces on ``inputs`` first."""
    min_doc_tokens: int = 64
    """Books (and records longer than ``max_doc_tokens``) are cut into documents of log-uniform
    token lengths between these two."""
    max_doc_tokens: int = 32768
    needle_fraction: float = 0.0
    """Fraction of documents rewritten as needle documents of the same length (data/needle.py)."""
    text_field: str = "text"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_doc_tokens <= self.max_doc_tokens:
            raise ValueError(f"need 1 <= min_doc_tokens <= max_doc_tokens, got {self.min_doc_tokens}, "
                             f"{self.max_doc_tokens}")
        if not 0.0 <= self.needle_fraction <= 1.0:
            raise ValueError(f"needle_fraction must be in [0, 1], got {self.needle_fraction}")
        if self.train_tokenizer is not None and not (isinstance(self.train_tokenizer, int) and self.train_tokenizer >= 64):
            raise ValueError(f"train_tokenizer must be a vocabulary size >= 64, got {self.train_tokenizer!r}")
        if self.train_tokenizer is not None and (":" in self.tokenizer or self.tokenizer == "smollm2"):
            raise ValueError(f"train_tokenizer: tokenizer must be the folder to write it to, got {self.tokenizer!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "prepare") -> "PrepareConfig":
        return configs.from_dict(cls, values, source)


def manifest_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.json")


def read_manifest(prefix: str | os.PathLike) -> dict[str, Any] | None:
    path = manifest_path(prefix)
    return json.loads(path.read_text()) if path.is_file() else None


def _texts(inputs: list[str], text_field: str):
    from longrope2.data.books import load_books
    from longrope2.data.indexed import iter_texts

    if inputs:
        return (text for _, text, _ in iter_texts(inputs, text_field))
    return (book.text for book in load_books(progress=False))


def run_prepare(config: PrepareConfig, progress: bool = True):
    """Train the tokenizer if asked (once), tokenize, write the dataset and its manifest."""
    from longrope2.data.indexed import check_sources, prepare_indexed, tokenizer_from_spec
    from longrope2.data.tokenize import train_sentencepiece

    check_sources(config.inputs)
    if config.train_tokenizer is not None and not Path(config.tokenizer, "tokenizer_config.json").is_file():
        train_sentencepiece(_texts(config.inputs, config.text_field), config.train_tokenizer, config.tokenizer)
    tokenizer, vocab = tokenizer_from_spec(config.tokenizer)
    stats = prepare_indexed(config.output, tokenizer, vocab, config.inputs, config.min_doc_tokens,
                            config.max_doc_tokens, config.seed, config.text_field, progress=progress,
                            needle_fraction=config.needle_fraction)
    manifest = {
        "prefix": str(config.output),
        "tokenizer": tokenizer.name,
        "vocab_size": vocab,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "sources": stats.sources,
        "needle_documents": stats.needle_documents,
        "max_document_tokens": max(stats.lengths, default=0),
        "config": asdict(config),
    }
    tmp = manifest_path(config.output).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path(config.output))
    return stats, vocab, tokenizer.name
