"""Per-pair RoPE rescale factors, one pure function per family.

Every family returns ``lambda`` (float64, length ``dim // 2``) so that the rescaled inverse
frequency of pair ``i`` is ``base ** (-2i/dim) / lambda_i``; the same vector is what HF's
``longrope`` rope config stores as ``long_factor``. ``FACTOR_FAMILIES`` maps a method name to its
function; ``NATIVE_ATTENTION_FACTOR`` gives the cos/sin scale each method is used with.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# Factors searched on a 0.01 grid can sit a hair outside [s, 2s] after float round-trips.
_BOUND_TOLERANCE = 1e-6


def _check_lengths(original_length: int, target_length: int) -> float:
    if original_length <= 0:
        raise ValueError(f"original_length must be positive, got {original_length}")
    if target_length < original_length:
        raise ValueError(
            f"target_length {target_length} is shorter than the original window {original_length}"
        )
    return target_length / original_length


def base_factors(dim: int, base: float, original_length: int, target_length: int) -> torch.Tensor:
    """The pre-trained RoPE: every factor is 1."""
    return torch.ones(dim // 2, dtype=torch.float64)


def pi_factors(dim: int, base: float, original_length: int, target_length: int) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): every pair slowed by s."""
    s = _check_lengths(original_length, target_length)
    return torch.full((dim // 2,), s, dtype=torch.float64)


def ntk_factors(dim: int, base: float, original_length: int, target_length: int) -> torch.Tensor:
    """NTK-aware base change ``base' = base * s**(dim/(dim-2))``: lambda_i = s ** (2i/(dim-2)).

    The first pair keeps its frequency and the last is slowed by exactly s.
    """
    s = _check_lengths(original_length, target_length)
    i = torch.arange(dim // 2, dtype=torch.float64)
    return s ** (2 * i / (dim - 2))


def yarn_factors(
    dim: int,
    base: float,
    original_length: int,
    target_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN (Peng et al. 2023) by-part interpolation, as transformers' ``yarn`` rope type.

    Pairs that turn more than ``beta_fast`` times in the window keep their frequency, pairs
    that turn fewer than ``beta_slow`` times are interpolated by s, a linear ramp in between.
    """
    s = _check_lengths(original_length, target_length)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_length / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers does the same to avoid a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the pair's frequency, 0 interpolates it by s
    # inv_freq = inv_freq_orig * ((1 - e) / s + e)  =>  lambda = 1 / ((1 - e) / s + e)
    return 1.0 / ((1 - extrapolation) / s + extrapolation)


def longrope2_factors(
    dim: int,
    base: float,
    original_length: int,
    target_length: int,
    critical_dim: int,
    upper_factors: Sequence[float],
) -> torch.Tensor:
    """LongRoPE2 factors (paper Sec. 3.2): searched factors at and above the critical dim,
    NTK-style ``lambda_i = lambda_rcd ** (i / rcd)`` below it.

    ``upper_factors`` holds the searched factors of pairs ``critical_dim .. dim/2 - 1``; they must
    be non-decreasing and lie in ``[s, 2s]``.
    """
    s = _check_lengths(original_length, target_length)
    half = dim // 2
    if not 0 < critical_dim < half:
        raise ValueError(f"critical_dim must be in [1, {half - 1}] for rotary dim {dim}, got {critical_dim}")
    upper = torch.as_tensor(list(upper_factors), dtype=torch.float64)
    if upper.shape != (half - critical_dim,):
        raise ValueError(
            f"critical_dim {critical_dim} needs {half - critical_dim} upper factors "
            f"(pairs {critical_dim}..{half - 1}), got {upper.numel()}"
        )
    check_searched_factors(upper, s)
    i = torch.arange(critical_dim, dtype=torch.float64)
    lower = upper[0] ** (i / critical_dim)
    return torch.cat([lower, upper])


def check_searched_factors(upper: torch.Tensor, scale: float) -> None:
    """Raise unless ``upper`` is non-decreasing and inside ``[scale, 2*scale]`` (paper Alg. 1)."""
    lo, hi = scale * (1 - _BOUND_TOLERANCE), 2 * scale * (1 + _BOUND_TOLERANCE)
    if upper.min() < lo or upper.max() > hi:
        raise ValueError(
            f"searched factors must lie in [s, 2s] = [{scale:g}, {2 * scale:g}], "
            f"got min {upper.min().item():g}, max {upper.max().item():g}"
        )
    steps = upper[1:] - upper[:-1]
    if (steps < -_BOUND_TOLERANCE * scale).any():
        first = int(torch.nonzero(steps < -_BOUND_TOLERANCE * scale)[0])
        raise ValueError(
            f"searched factors must be non-decreasing; factor {first + 1} ({upper[first + 1].item():g}) "
            f"< factor {first} ({upper[first].item():g})"
        )


def given_factors(dim: int, factors: Sequence[float]) -> torch.Tensor:
    """Factors from a list (a published ``long_factor``, a search result file)."""
    values = torch.as_tensor(list(factors), dtype=torch.float64)
    check_factor_vector(values, dim)
    return values


def check_factor_vector(values: torch.Tensor, dim: int, name: str = "factors") -> None:
    if values.shape != (dim // 2,):
        raise ValueError(f"{name} must have rotary_dim/2 = {dim // 2} entries, got {values.numel()}")
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"{name} must be finite and positive, got min {values.min().item():g}")


def longrope_attention_factor(original_length: int, target_length: int) -> float:
    """HF ``longrope`` default cos/sin scale ``sqrt(1 + ln(s) / ln(L_orig))`` (1 when s <= 1)."""
    s = target_length / original_length
    return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(original_length))


def yarn_attention_factor(original_length: int, target_length: int) -> float:
    """YaRN's ``0.1 ln(s) + 1`` (1 when s <= 1), as transformers' ``yarn``."""
    s = target_length / original_length
    return 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0


FACTOR_FAMILIES: dict[str, Callable[..., torch.Tensor]] = {
    "base": base_factors,
    "pi": pi_factors,
    "ntk": ntk_factors,
    "yarn": yarn_factors,
    "longrope2": longrope2_factors,
}

# Each method with the attention factor it was published with; PI and NTK use none.
NATIVE_ATTENTION_FACTOR: dict[str, Callable[[int, int], float]] = {
    "base": lambda original, target: 1.0,
    "pi": lambda original, target: 1.0,
    "ntk": lambda original, target: 1.0,
    "yarn": yarn_attention_factor,
    "longrope2": longrope_attention_factor,
}


def family_factors(method: str, dim: int, base: float, original_length: int, target_length: int, **params) -> torch.Tensor:
    """Look a family up by name and compute its factors; unknown names list the known ones."""
    try:
        family = FACTOR_FAMILIES[method]
    except KeyError:
        raise ValueError(f"unknown rope method {method!r}; known: {', '.join(FACTOR_FAMILIES)}") from None
    return family(dim, base, original_length, target_length, **params)

