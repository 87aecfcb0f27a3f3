"""Text -> token ids for needle documents and corpora, from an HF tokenizer or a hashed-word
tokenizer for randomly initialised test models (no vocabulary file needed)."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable


@dataclass
class TextTokenizer:
    encode: Callable[[str], list[int]]
    """Ids without special tokens."""
    bos_token_id: int | None
    """Prepended to each document when the tokenizer adds one by default (LLaMA-3), else None."""
    name: str


def hashed_words(vocab_size: int) -> TextTokenizer:
    """Words and single digits hashed into ``vocab_size`` ids: a deterministic stand-in that lets
    random-weight models run the real needle pipeline (digits stay separate tokens, as in
    LLaMA and SmolLM2, so the 7-digit answer is 7 tokens)."""
    pattern = re.compile(r"\d|[^\s\d]+")

    def encode(text: str) -> list[int]:
        return [zlib.crc32(word.encode()) % vocab_size for word in pattern.findall(text)]

    return TextTokenizer(encode, None, f"hashed-words/{vocab_size}")


def from_hf(tokenizer, name: str = "hf") -> TextTokenizer:
    """Wrap an HF tokenizer; BOS is used only if the tokenizer adds it by default."""
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    adds_bos = len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
    return TextTokenizer(
        lambda text: tokenizer(text, add_special_tokens=False).input_ids,
        tokenizer.bos_token_id if adds_bos else None,
        name,
    )
