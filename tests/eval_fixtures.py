"""A tiny random HF LLaMA with a real (byte-level BPE, trained on the fly) tokenizer, for the
eval tests: everything offline, a few seconds."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

WINDOW, TARGET = 256, 1024


@functools.lru_cache(maxsize=1)
def books() -> tuple[tuple[str, str], ...]:
    from longrope2.data.books import load_books

    return tuple((b.title, b.text[:150_000]) for b in load_books(progress=False)[:4])


@functools.lru_cache(maxsize=1)
def tokenizer():
    """Byte-level BPE with single-digit tokens (as LLaMA/SmolLM2), 1024 ids; decodes exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[:60_000] for _, text in books()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(seed: int = 0, rope_fields: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    fields = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                  intermediate_size=128, vocab_size=len(tok), max_position_embeddings=WINDOW, rope_theta=10000.0,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.3, tie_word_embeddings=False)
    fields.update(rope_fields or {})
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def save_tiny(folder: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def write_books(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (title, text) in enumerate(books()):
        path = folder / f"{i}_{title.replace(' ', '_')}.txt"
        path.write_text(text)
        paths.append(str(path))
    return paths
