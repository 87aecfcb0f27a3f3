"""RoPE frequencies, periods and the critical dimensions of LongRoPE2 (arXiv 2502.20082, Sec. 3).

Pair ``i`` of a rotary dimension ``d`` turns at ``theta_i = base ** (-2i/d)`` radians per token,
so it completes one period every ``2*pi / theta_i`` tokens. Pairs whose period is longer than
the pre-training window never saw a whole turn and are the ones that need rescaling.
"""

from __future__ import annotations

import math

import torch


def rotary_dim(head_dim: int, rotary_percent: float = 1.0) -> int:
    """Number of channels that are rotated (Phi-3/Phi-4 rotate only a fraction of each head)."""
    if not 0.0 < rotary_percent <= 1.0:
        raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
    dim = int(head_dim * rotary_percent)
    if dim % 2:
        raise ValueError(f"rotary dim {dim} (head_dim {head_dim} x {rotary_percent}) must be even")
    return dim


def base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """``base ** (-2i/dim)`` for each pair, float32, computed as transformers and megatron do."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def periods(dim: int, base: float) -> torch.Tensor:
    """Period in tokens of each rotary pair, float64 (the largest exceed 1e6 tokens)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 2 * math.pi * torch.tensor(base, dtype=torch.float64) ** exponent


def _pair_where_period_reaches(dim: int, base: float, length: float) -> int:
    # Pair i has period 2*pi*base^(2i/dim); it reaches `length` at i = (dim/2) log_base(length/2pi).
    return math.ceil((dim / 2) * math.log(length / (2 * math.pi)) / math.log(base))


def theoretical_critical_dim(dim: int, base: float, original_length: int) -> int:
    """First pair whose period exceeds the pre-training window (the paper's d_tcd).

    LLaMA3-8B (128, 5e5, 8k) -> 35; Phi3-mini (96, 1e4, 2k) -> 31.
    """
    return _pair_where_period_reaches(dim, base, original_length)


def ten_period_dim(dim: int, base: float, original_length: int) -> int:
    """First pair that completes fewer than ten periods in the window: the search's lower bound.

    LLaMA3-8B -> 24; Phi3-mini -> 19.
    """
    return _pair_where_period_reaches(dim, base, original_length / 10)


def inv_freq_from_factors(dim: int, base: float, factors: torch.Tensor | list[float]) -> torch.Tensor:
    """Rescaled inverse frequencies ``1 / (lambda_i * base ** (2i/dim))`` in HF's exact order of ops."""
    factors = torch.as_tensor(factors, dtype=torch.float32)
    if factors.shape != (dim // 2,):
        raise ValueError(f"expected {dim // 2} factors for rotary dim {dim}, got {tuple(factors.shape)}")
    return 1.0 / (factors * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
