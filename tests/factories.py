"""Shared test fixtures' building blocks."""

from __future__ import annotations

import torch

from longrope2.model.config import ModelConfig
from longrope2.rope import RopeScaling, longrope2_factors


def ramp_longrope2_scaling(cfg: ModelConfig, original: int, target: int) -> RopeScaling:
    """A LongRoPE2-shaped scaling for ``cfg``: critical dim at half the pairs, searched factors
    ramping from 1.2s to 1.8s above it, the NTK-style fill below."""
    half = cfg.rotary_dim // 2
    crit = half // 2
    s = target / original
    upper = torch.linspace(1.2 * s, 1.8 * s, half - crit).tolist()
    factors = longrope2_factors(cfg.rotary_dim, cfg.rope_theta, original, target, crit, upper)
    return RopeScaling.from_factors(cfg.rope_geometry, target, factors.tolist())
