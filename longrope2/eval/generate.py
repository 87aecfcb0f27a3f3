"""Greedy generation across the original context window, with one KV-cache recompute.

A ``longrope`` model uses its short factors while the sequence fits the original window and its
long (rescaled) factors beyond it (HF's rule: the long factors apply to a forward whose largest
position is >= the original window). Keys already in a KV cache were rotated with the short
factors, so continuing a cached generation past the window would mix the two RoPEs. Like
transformers' ``Phi3ForCausalLM.prepare_inputs_for_generation``, the first step whose sequence
exceeds the window drops the cache and re-runs the whole sequence once with the rescaled RoPE;
after that, decoding is cached again. ``greedy_generate`` does this for any HF causal LM whose
config carries ``longrope`` parameters (LLaMA/SmolLM2 included, where HF itself would keep the
stale cache), and times the recompute so reports can state its cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch


@dataclass
class Generation:
    new_tokens: list[int]
    """Generated ids, without the prompt."""
    switched_at: Optional[int]
    """Sequence length (prompt + generated) whose forward recomputed the KV cache with the rescaled
    RoPE; None if the sequence never crossed the window from below (also when the prompt alone
    was longer than the window: its prefill already used the rescaled RoPE)."""
    prefill_s: float
    decode_s: float
    """Cached decoding steps, the recompute excluded."""
    recompute_s: float

    @property
    def decode_steps(self) -> int:
        return max(len(self.new_tokens) - 1 - (self.switched_at is not None), 0)


def longrope_window(config: Any) -> Optional[int]:
    """The original window of a ``longrope`` HF config (transformers 5 ``rope_parameters`` or 4.x
    ``rope_scaling``), or None for any other RoPE, which never switches."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    window = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if not window:
        raise ValueError("a longrope config needs original_max_position_embeddings")
    return int(window)


def _as_stop_ids(eos_token_id: int | Iterable[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                    eos_token_id: int | Iterable[int] | None = None,
                    stop_strings: Iterable[str] | None = None, tokenizer=None) -> Generation:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (``[n]`` or ``[1, n]``).

    Stops early at an ``eos_token_id`` (kept in the output) or once the decoded continuation
    contains one of ``stop_strings`` (needs ``tokenizer``).
    """
    from transformers import DynamicCache

    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one sequence ([n] or [1, n]); got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop_strings = list(stop_strings or [])
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode the continuation")
    stop_ids = _as_stop_ids(eos_token_id)
    window = longrope_window(model.config)
    device = next(model.parameters()).device
    tokens = input_ids.to(device)

    def forward(ids: torch.Tensor, cache, start: int):
        positions = torch.arange(start, start + ids.shape[1], device=device).unsqueeze(0)
        out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].argmax().item()

    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    next_id = forward(tokens, cache, 0)
    prefill_s = time.perf_counter() - t0
    new: list[int] = [next_id]
    switched_at, decode_s, recompute_s = None, 0.0, 0.0
    while len(new) < max_new_tokens and next_id not in stop_ids:
        if stop_strings and any(s in tokenizer.decode(new) for s in stop_strings):
            break
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
        cached = cache.get_seq_length()
        t0 = time.perf_counter()
        if window is not None and cached <= window < tokens.shape[1]:
            # first step past the window: re-encode everything with the rescaled RoPE
            cache = DynamicCache(config=model.config)
            next_id = forward(tokens, cache, 0)
            switched_at, recompute_s = tokens.shape[1], time.perf_counter() - t0
        else:
            next_id = forward(tokens[:, cached:], cache, cached)
            decode_s += time.perf_counter() - t0
        new.append(next_id)
    return Generation(new_tokens=new, switched_at=switched_at, prefill_s=prefill_s, decode_s=decode_s,
                      recompute_s=recompute_s)


@torch.no_grad()
def greedy_generate_batch(model, prompts: list[list[int]], max_new_tokens: int, *, pad_token_id: int,
                          eos_token_id: int | Iterable[int] | None = None) -> list[Generation]:
    """Greedy decoding of several prompts per forward: left-padded with an attention mask,
    positions counted per row from its first real token, the LM head only at the last position.

    Every row of one forward gets the same RoPE (HF picks ``longrope``'s factors by the largest
    position in the batch), so rows are batched only when their whole generation stays on one
    side of the original window; a row whose generation crosses it goes through
    ``greedy_generate`` alone and keeps its single KV-cache recompute. Token-identical to
    ``greedy_generate`` row by row (tests/test_generate.py).
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate_batch needs non-empty prompts")
    window = longrope_window(model.config)
    device = next(model.parameters()).device
    results: list[Optional[Generation]] = [None] * len(prompts)
    short, long = [], []
    for i, prompt in enumerate(prompts):
        if window is None or len(prompt) + max_new_tokens <= window:
            short.append(i)
        elif len(prompt) > window:
            long.append(i)
        else:  # crosses the window while generating
            results[i] = greedy_generate(model, torch.tensor(prompt, device=device), max_new_tokens,
                                         eos_token_id=eos_token_id)
    stop_ids = _as_stop_ids(eos_token_id)
    for rows in (short, long):
        if not rows:
            continue
        width = max(len(prompts[i]) for i in rows)
        # rows of one length need no mask: SDPA then runs its causal kernel instead of
        # materialising a [rows, heads, width, width] masked attention (CPU: the math path)
        padded = any(len(prompts[i]) != width for i in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], device=device)
            mask[r, width - len(prompts[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1)
        prefill_s, decode_s = time.perf_counter() - t0, 0.0
        new = [[int(t)] for t in next_ids.tolist()]
        done = [t[0] in stop_ids for t in new]
        last, steps = positions[:, -1:], 1
        while not all(done) and steps < max_new_tokens:
            steps += 1
            t0 = time.perf_counter()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = model(input_ids=next_ids[:, None], attention_mask=mask if padded else None, position_ids=last,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1)
            decode_s += time.perf_counter() - t0
            for r, t in enumerate(next_ids.tolist()):
                if not done[r]:  # a finished row is carried along to the end; its tokens are dropped
                    new[r].append(int(t))
                    done[r] = int(t) in stop_ids
        for r, i in enumerate(rows):
            results[i] = Generation(new_tokens=new[r], switched_at=None, prefill_s=prefill_s / len(rows),
                                    decode_s=decode_s / len(rows), recompute_s=0.0)
    return results  # type: ignore[return-value]
