"""``RopeScaling``: one rescaled RoPE, and its round-trip through HF's ``longrope`` config.

transformers' contract (``modeling_rope_utils._compute_longrope_parameters``): ``short_factor``
and ``long_factor`` of length rotary_dim/2; the long set is used when the sequence
(``max(position_ids) + 1``) is longer than ``original_max_position_embeddings``; cos and sin are
scaled by ``attention_factor`` in both regimes, defaulting to ``sqrt(1 + ln(s)/ln(L_orig))``
with ``s = factor`` or ``max_position_embeddings / original_max_position_embeddings``.
transformers >= 5 stores it under ``rope_parameters``; older configs under ``rope_scaling`` with
``rope_theta`` (and, for Phi-3, ``original_max_position_embeddings``) at the top level.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from longrope2.rope.factors import (
    NATIVE_ATTENTION_FACTOR,
    check_factor_vector,
    family_factors,
    longrope_attention_factor,
)
from longrope2.rope.frequencies import inv_freq_from_factors
from longrope2.rope.frequencies import rotary_dim as _rotary_dim

HFStyle = Literal["rope_parameters", "rope_scaling"]


@dataclass(frozen=True)
class RopeGeometry:
    """What the critical-dimension math needs to know about a model's RoPE."""

    head_dim: int
    rope_theta: float
    original_max_position_embeddings: int
    rotary_percent: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ValueError(f"rope_theta (the RoPE base) must be a finite number > 1, got {self.rope_theta:g}")
        if not isinstance(self.original_max_position_embeddings, int) or self.original_max_position_embeddings <= 0:
            raise ValueError("the original window (original_max_position_embeddings) must be a positive number of "
                             f"tokens, got {self.original_max_position_embeddings}")
        if not 0 < self.rotary_percent <= 1:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent:g}")
        if self.rotary_dim < 2:
            raise ValueError(f"rotary_percent {self.rotary_percent:g} of head_dim {self.head_dim} rotates no channel pair")

    @property
    def rotary_dim(self) -> int:
        return _rotary_dim(self.head_dim, self.rotary_percent)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> "RopeGeometry":
        """Read head dim, base, partial rotary and the pre-training window from an HF config."""
        cfg = _as_dict(config)
        rope = _rope_dict(cfg) or {}
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise ValueError("HF config has no rope_theta (neither top-level nor in rope_parameters)")
        percent = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        original = (
            cfg.get("original_max_position_embeddings")
            or rope.get("original_max_position_embeddings")
            or cfg.get("max_position_embeddings")
        )
        if not original:
            raise ValueError("HF config has neither original_max_position_embeddings nor max_position_embeddings")
        return cls(int(head_dim), float(theta), int(original), float(percent))


@dataclass(frozen=True)
class RopeScaling:
    """A rescaled RoPE with a short (<= original window) and a long factor set.

    ``attention_factor=None`` means HF's default, resolved by ``resolved_attention_factor``.
    """

    rotary_dim: int
    rope_theta: float
    original_max_position_embeddings: int
    max_position_embeddings: int
    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...] = field(default=())
    attention_factor: float | None = None
    factor: float | None = None
    """HF's optional explicit scale used for the default attention factor."""

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if not self.original_max_position_embeddings or self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"original_max_position_embeddings must be a positive int, got {self.original_max_position_embeddings}"
            )
        if self.max_position_embeddings < self.original_max_position_embeddings:
            raise ValueError(
                f"max_position_embeddings {self.max_position_embeddings} < original_max_position_embeddings "
                f"{self.original_max_position_embeddings}"
            )
        if self.rope_theta <= 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
        short = self.short_factor or (1.0,) * (self.rotary_dim // 2)
        object.__setattr__(self, "short_factor", tuple(float(x) for x in short))
        check_factor_vector(torch.tensor(self.long_factor, dtype=torch.float64), self.rotary_dim, "long_factor")
        check_factor_vector(torch.tensor(self.short_factor, dtype=torch.float64), self.rotary_dim, "short_factor")
        if self.attention_factor is not None and not (self.attention_factor > 0 and math.isfinite(self.attention_factor)):
            raise ValueError(f"attention_factor must be positive, got {self.attention_factor}")

    # --- what the model uses -------------------------------------------------------------

    @property
    def scale(self) -> float:
        """s = L_target / L_orig."""
        return self.max_position_embeddings / self.original_max_position_embeddings

    @property
    def resolved_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        original = self.original_max_position_embeddings
        scale = self.factor if self.factor is not None else self.scale
        return longrope_attention_factor(original, scale * original)

    def uses_long_factors(self, seq_len: int) -> bool:
        """HF's switch: the long set once ``max(position_ids) + 1`` exceeds the original window."""
        return seq_len > self.original_max_position_embeddings

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        factors = self.long_factor if self.uses_long_factors(seq_len) else self.short_factor
        return inv_freq_from_factors(self.rotary_dim, self.rope_theta, factors)

    @property
    def short_inv_freq(self) -> torch.Tensor:
        return inv_freq_from_factors(self.rotary_dim, self.rope_theta, self.short_factor)

    @property
    def long_inv_freq(self) -> torch.Tensor:
        return inv_freq_from_factors(self.rotary_dim, self.rope_theta, self.long_factor)

    # --- building ------------------------------------------------------------------------

    @classmethod
    def from_method(
        cls,
        method: str,
        geometry: RopeGeometry,
        target_length: int,
        attention_factor: float | None = None,
        **params: Any,
    ) -> "RopeScaling":
        """Long factors of a named family (pi, ntk, yarn, longrope2, base), original RoPE below
        the window, and the family's own attention factor unless one is given."""
        orig = geometry.original_max_position_embeddings
        factors = family_factors(method, geometry.rotary_dim, geometry.rope_theta, orig, target_length, **params)
        if attention_factor is None:
            attention_factor = NATIVE_ATTENTION_FACTOR[method](orig, target_length)
        return cls(
            rotary_dim=geometry.rotary_dim,
            rope_theta=geometry.rope_theta,
            original_max_position_embeddings=orig,
            max_position_embeddings=target_length,
            long_factor=tuple(factors.tolist()),
            attention_factor=attention_factor,
        )

    @classmethod
    def from_factors(
        cls,
        geometry: RopeGeometry,
        target_length: int,
        long_factor: list[float],
        short_factor: list[float] | None = None,
        attention_factor: float | None = None,
    ) -> "RopeScaling":
        return cls(
            rotary_dim=geometry.rotary_dim,
            rope_theta=geometry.rope_theta,
            original_max_position_embeddings=geometry.original_max_position_embeddings,
            max_position_embeddings=target_length,
            long_factor=tuple(long_factor),
            short_factor=tuple(short_factor or ()),
            attention_factor=attention_factor,
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        geometry: RopeGeometry,
        target_length: int | None = None,
        attention_factor: float | None = None,
        fallback_target_length: int | None = None,
    ) -> "RopeScaling":
        """Factors from a file, for a model of this geometry: a search ``best.json``
        (``long_factor``, ``target_length``, ``original_length``), an HF ``config.json`` or
        ``rope_config.json`` (``rope_parameters`` / ``rope_scaling``), or a JSON list of long
        factors. ``target_length`` and ``attention_factor`` override the file's; the file's
        target is used before ``fallback_target_length``. The original window and the factor
        count must be the model's."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rope factors: {path} not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"rope factors: {path} is not JSON ({error})") from None
        short = file_attention = file_target = original = None
        if isinstance(raw, list):
            long = raw
        elif isinstance(raw, dict):
            section = _rope_dict(raw)
            if section is not None:  # an HF config / rope_config.json
                long, short, file_attention = (section.get(k) for k in ("long_factor", "short_factor", "attention_factor"))
                file_target = raw.get("max_position_embeddings")
                original = raw.get("original_max_position_embeddings") or section.get("original_max_position_embeddings")
            else:  # a search result
                long, short, file_attention = (raw.get(k) for k in ("long_factor", "short_factor", "attention_factor"))
                file_target, original = raw.get("target_length"), raw.get("original_length")
            if long is None:
                raise ValueError(f"rope factors: {path} has no long_factor (expected a search best.json, an HF "
                                 "config with a longrope section, or a JSON list of factors)")
        else:
            raise ValueError(f"rope factors: {path} holds a {type(raw).__name__}, not factors")
        if original is not None and int(original) != geometry.original_max_position_embeddings:
            raise ValueError(f"rope factors: {path} is for an original window of {original}, the model's is "
                             f"{geometry.original_max_position_embeddings}")
        want = geometry.rotary_dim // 2
        if len(long) != want:
            raise ValueError(f"rope factors: {path} has {len(long)} long factors, the model needs rotary_dim/2 = {want}")
        target = target_length or file_target or fallback_target_length
        if target is None:
            raise ValueError(f"rope factors: {path} does not say the target length; give it (--target-length)")
        attention = attention_factor if attention_factor is not None else file_attention
        return cls.from_factors(geometry, int(target), list(long), short, attention)

    # --- HF interop ----------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> "RopeScaling":
        """Read a ``longrope`` rope config from an HF config (dict, config.json contents or a
        ``PretrainedConfig``), new (``rope_parameters``) or legacy (``rope_scaling``) style."""
        cfg = _as_dict(config)
        rope = _rope_dict(cfg)
        if not rope:
            raise ValueError("HF config has no rope_parameters / rope_scaling section")
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in ("longrope", "su"):  # "su" is the name Phi-3 preview configs used
            raise ValueError(f"expected rope_type 'longrope', got {rope_type!r}")
        for key in ("short_factor", "long_factor"):
            if key not in rope:
                raise ValueError(f"longrope config is missing {key!r}")
        geometry = RopeGeometry.from_hf_config(cfg)
        original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        if not original:
            raise ValueError("longrope config is missing original_max_position_embeddings")
        if "max_position_embeddings" not in cfg:
            raise ValueError("HF config is missing max_position_embeddings")
        return cls(
            rotary_dim=geometry.rotary_dim,
            rope_theta=geometry.rope_theta,
            original_max_position_embeddings=int(original),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            long_factor=tuple(rope["long_factor"]),
            short_factor=tuple(rope["short_factor"]),
            attention_factor=rope.get("attention_factor"),
            factor=rope.get("factor"),
        )

    def to_hf_config(self, style: HFStyle = "rope_parameters") -> dict[str, Any]:
        """Config.json fields to merge into an HF model config.

        ``rope_parameters`` is what transformers >= 5 writes; ``rope_scaling`` the legacy form
        (transformers 4.x, vLLM). ``partial_rotary_factor`` and ``head_dim`` stay the model's.
        """
        rope: dict[str, Any] = {
            "rope_type": "longrope",
            "short_factor": list(self.short_factor),
            "long_factor": list(self.long_factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }
        if self.attention_factor is not None:
            rope["attention_factor"] = self.attention_factor
        # transformers warns when `factor` is absent (it then derives it from the two windows)
        rope["factor"] = self.factor if self.factor is not None else self.scale
        # Top level too: transformers prefers a top-level value over the one in the rope dict,
        # and Phi3Config defaults it to 4096, which would silently override ours.
        fields: dict[str, Any] = {
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }
        if style == "rope_parameters":
            rope["rope_theta"] = self.rope_theta
            fields["rope_parameters"] = rope
        elif style == "rope_scaling":
            rope["type"] = "longrope"
            fields["rope_scaling"] = rope
            fields["rope_theta"] = self.rope_theta
        else:
            raise ValueError(f"style must be 'rope_parameters' or 'rope_scaling', got {style!r}")
        return fields


def _as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected an HF config or a dict, got {type(config).__name__}")


def _rope_dict(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    return dict(rope) if rope else None
