"""The RoPE math of LongRoPE2: frequencies, critical dimensions, factor families, HF interop.

Plain torch; the megatron-facing rotary module lives in ``longrope2.rope.rotary``.
"""

from longrope2.rope.factors import (
    FACTOR_FAMILIES,
    NATIVE_ATTENTION_FACTOR,
    family_factors,
    given_factors,
    longrope2_factors,
    longrope_attention_factor,
    yarn_attention_factor,
)
from longrope2.rope.frequencies import (
    base_inv_freq,
    inv_freq_from_factors,
    periods,
    rotary_dim,
    ten_period_dim,
    theoretical_critical_dim,
)
from longrope2.rope.scaling import RopeGeometry, RopeScaling

__all__ = [
    "FACTOR_FAMILIES",
    "NATIVE_ATTENTION_FACTOR",
    "RopeGeometry",
    "RopeScaling",
    "base_inv_freq",
    "family_factors",
    "given_factors",
    "inv_freq_from_factors",
    "longrope2_factors",
    "longrope_attention_factor",
    "periods",
    "rotary_dim",
    "ten_period_dim",
    "theoretical_critical_dim",
    "yarn_attention_factor",
]
