"""Perplexities on an HF causal LM with the LM head run only where a token is scored.

``logits_to_keep`` (transformers >= 4.50; a 1-D index tensor in 5.x) narrows the hidden states
before the LM head, so a 16k-token document with 512 scored tokens builds a ``[512, vocab]``
logit matrix instead of ``[16k, vocab]``.

* needle-driven PPL: the answer tokens of needle documents (``data/needle.py``, the paper's
  template), the needle near the start;
* book PPL: the last ``last_tokens`` tokens of a ``length``-token window of a book.
"""

from __future__ import annotations

from typing import Sequence

import torch

from longrope2.data.needle import NeedleDocument


@torch.no_grad()
def token_nll(model, tokens: Sequence[int], scored: Sequence[int]) -> tuple[float, int]:
    """Sum of ``-log p(tokens[i] | tokens[:i])`` over the indices ``scored`` (all >= 1), and
    their count. The model sees ``tokens[:max(scored)]``."""
    scored = sorted(set(int(i) for i in scored))
    if not scored or scored[0] < 1 or scored[-1] >= len(tokens):
        raise ValueError(f"scored positions must lie in [1, {len(tokens) - 1}]")
    device = next(model.parameters()).device
    inputs = torch.tensor([list(tokens[:scored[-1]])], device=device)
    keep = torch.tensor([i - 1 for i in scored], device=device)
    positions = torch.arange(inputs.shape[1], device=device)[None]
    logits = model(input_ids=inputs, position_ids=positions, logits_to_keep=keep, use_cache=False).logits[0]
    labels = torch.tensor([tokens[i] for i in scored], device=device)
    nll = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    return nll.item(), len(scored)


def needle_nll(model, document: NeedleDocument) -> tuple[float, int]:
    """Answer-token NLL of one needle document (the model sees ``length - 1`` tokens)."""
    return token_nll(model, document.tokens, range(document.answer_start, document.length))


def book_window_nll(model, tokens: Sequence[int], last_tokens: int) -> tuple[float, int]:
    """NLL of the last ``last_tokens`` tokens of ``tokens`` given everything before them."""
    if not 0 < last_tokens < len(tokens):
        raise ValueError(f"last_tokens must be in [1, {len(tokens) - 1}], got {last_tokens}")
    return token_nll(model, tokens, range(len(tokens) - last_tokens, len(tokens)))
