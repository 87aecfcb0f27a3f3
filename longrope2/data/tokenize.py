"""Text -> token ids for needle documents and corpora, from an HF tokenizer or a hashed-word
tokenizer for randomly initialised test models (no vocabulary file needed)."""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


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


def train_sentencepiece(texts: Iterable[str], vocab_size: int, folder: str | os.PathLike) -> Path:
    """Train a sentencepiece BPE model of ``vocab_size`` pieces on ``texts`` (one paragraph per
    line) and write it as an HF tokenizer folder (``tokenizer.model`` + ``tokenizer.json``, a
    LLaMA-style tokenizer that adds ``<s>``), loadable with ``AutoTokenizer.from_pretrained``.

    Digits are split (a 7-digit needle answer is 7 tokens, as in LLaMA), unknown characters fall
    back to bytes, and training is single-threaded, so the same texts give the same model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    model = io.BytesIO()
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="bpe", split_digits=True,
        byte_fallback=True, character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 20, input_sentence_size=0, minloglevel=2)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    AutoTokenizer.from_pretrained(tmp).save_pretrained(tmp)  # adds tokenizer.json (fast)
    os.replace(tmp, folder)  # complete or absent
    return folder
