"""The dual-cache rotary embedding that megatron-core's ``GPTModel`` calls.

It holds two inverse-frequency sets, the short (original window) and the long (rescaled) one,
and picks per micro-batch with HF's rule: long once ``offset + max_seq_len`` (the largest
position + 1) exceeds the original window. For packed THD input megatron passes the longest
document's length, so packed short documents keep the original RoPE.

It is a drop-in for ``GPTModel.rotary_pos_emb`` (same ``forward`` and ``get_rotary_seq_len``);
megatron keeps applying the angles (``apply_rotary_pos_emb``, CP slicing, THD). Packed THD input
under context parallelism gets the unsliced angles of the longest padded document: megatron's
``_apply_rotary_pos_emb_thd`` cuts each document's chunks r and 2cp-1-r from them along the
padded ``cu_seqlens`` (``cu_seqlens_q_padded``); the sampler keeps padded short documents within
the original window, so they still get the original RoPE. Two megatron
traps are avoided: its module is ``lru_cache``d on the arguments, so factors swapped in place
would return stale angles (ours keys the cache on a factor version), and the attention factor
(cos/sin scale) has no GPT-path setting, so ``set_attention_factor`` routes it through the
YaRN concentration-factor hook that megatron's attention reads for every layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from longrope2.rope.frequencies import inv_freq_from_factors, rotary_dim as _rotary_dim
from longrope2.rope.scaling import RopeScaling

_CACHE_SIZE = 8


class DualCacheRotaryEmbedding(nn.Module):
    """Rotary angles ``[s, 1, 1, rotary_dim]`` from the short or the long factor set."""

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        rotary_base: float,
        original_max_position_embeddings: int,
        scaling: Optional[RopeScaling] = None,
        rotary_interleaved: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        self.dim = _rotary_dim(kv_channels, rotary_percent)
        self.rotary_base = rotary_base
        self.original_max_position_embeddings = original_max_position_embeddings
        self.rotary_interleaved = rotary_interleaved
        self.cp_group = cp_group
        # Plain fp32 attributes, not buffers (as megatron keeps ``inv_freq``): a model cast to
        # bf16 (``Float16Module``) would otherwise round them, and positions built in their dtype,
        # until only ~1.4k of 131k positions stay distinct. ``_apply`` follows device moves only.
        # Never in weight checkpoints: factors live in the rope config.
        self.short_inv_freq = inv_freq_from_factors(self.dim, rotary_base, [1.0] * (self.dim // 2)).float()
        self.long_inv_freq = self.short_inv_freq.clone()
        self.scaling: Optional[RopeScaling] = None
        self._version = 0
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        if scaling is not None:
            self.set_scaling(scaling)

    # --- factors -------------------------------------------------------------------------

    def set_scaling(self, scaling: Optional[RopeScaling]) -> None:
        """Swap the factor sets in place (weights untouched); ``None`` restores the original RoPE.

        The attention factor is not set here: it lives in the model config (``set_attention_factor``).
        """
        if scaling is not None:
            if scaling.rotary_dim != self.dim:
                raise ValueError(f"rope scaling is for rotary dim {scaling.rotary_dim}, the model rotates {self.dim}")
            if scaling.original_max_position_embeddings != self.original_max_position_embeddings:
                raise ValueError(
                    f"rope scaling is for an original window of {scaling.original_max_position_embeddings}, "
                    f"the model's is {self.original_max_position_embeddings}"
                )
            if not math.isclose(scaling.rope_theta, self.rotary_base):
                raise ValueError(f"rope scaling has base {scaling.rope_theta}, the model {self.rotary_base}")
            short, long = scaling.short_inv_freq, scaling.long_inv_freq
        else:
            short = long = inv_freq_from_factors(self.dim, self.rotary_base, [1.0] * (self.dim // 2))
        device = self.short_inv_freq.device
        self.short_inv_freq = short.to(device=device, dtype=torch.float32)
        self.long_inv_freq = long.to(device=device, dtype=torch.float32)
        self.scaling = scaling
        self._version += 1
        self._cache.clear()

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.bfloat16()``, ``.half()``: move the frequencies with the
        module, never cast them (``fn`` on an empty fp32 probe says where it is going)."""
        module = super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.short_inv_freq.device)).device
        if device != self.short_inv_freq.device:
            self.short_inv_freq = self.short_inv_freq.to(device)
            self.long_inv_freq = self.long_inv_freq.to(device)
            self._cache.clear()
        return module

    def uses_long_factors(self, max_seq_len: int, offset: int = 0) -> bool:
        return offset + max_seq_len > self.original_max_position_embeddings

    # --- megatron's RotaryEmbedding interface --------------------------------------------

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> Tensor:
        inv_freq = self.long_inv_freq if self.uses_long_factors(max_seq_len, offset) else self.short_inv_freq
        positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.float32) + offset
        return torch.outer(positions, inv_freq)

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cos(freqs), torch.sin(freqs)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> Tensor:
        """Angles for positions ``offset .. offset + max_seq_len``, this CP rank's chunks only.

        ``max_seq_len`` is the full (pre-CP) length, or the longest document for packed input,
        exactly what megatron's ``get_rotary_seq_len`` returns.
        """
        cp_group = cp_group if cp_group is not None else self.cp_group
        cp_size = cp_group.size() if cp_group is not None else 1
        cp_rank = cp_group.rank() if cp_group is not None else 0
        key = (self._version, max_seq_len, offset, packed_seq, cp_size, cp_rank, self.long_inv_freq.device)
        emb = self._cache.get(key)
        if emb is None:
            emb = self.get_emb(max_seq_len, offset)
            if cp_size > 1 and not packed_seq:
                # megatron's slicing: this rank keeps chunks [r, 2cp-1-r] of 2cp (load balance)
                from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

                emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
            self._cache[key] = emb
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return emb

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, *, inference_params=None) -> int:
        """Megatron's own rule (sequence-parallel and CP aware; longest document for THD)."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        return RotaryEmbedding.get_rotary_seq_len(
            self, inference_context, transformer, transformer_input, transformer_config,
            packed_seq_params, inference_params=inference_params,
        )


def set_attention_factor(transformer_config, attention_factor: float) -> None:
    """Make megatron's attention scale cos and sin by ``attention_factor`` (HF's longrope
    ``attention_scaling``), in every layer, for the rotated channels only, as HF does.

    Megatron's GPT path reads one cos/sin scale, YaRN's concentration factor
    ``(0.1*m*ln(f) + 1) / (0.1*m_all*ln(f) + 1)``; ``f = e``, ``m = 10(a - 1)``, ``m_all = 0``
    makes it exactly ``a``. With the fused TE RoPE megatron falls back to the unfused kernel when
    the factor is not 1, so fusion is switched off here rather than warned about every step.
    """
    if not (attention_factor > 0 and math.isfinite(attention_factor)):
        raise ValueError(f"attention_factor must be positive, got {attention_factor}")
    if attention_factor == 1.0:
        for name in ("yarn_rotary_scaling_factor", "yarn_mscale", "yarn_mscale_all_dim"):
            if name in vars(transformer_config):
                delattr(transformer_config, name)
        return
    transformer_config.yarn_rotary_scaling_factor = math.e
    transformer_config.yarn_mscale = 10.0 * (attention_factor - 1.0)
    transformer_config.yarn_mscale_all_dim = 0.0
    transformer_config.apply_rope_fusion = False


def attention_factor_of(transformer_config) -> float:
    """The cos/sin scale megatron's attention will use for this config."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    return _yarn_get_concentration_factor_from_config(transformer_config)


def install_dual_cache_rotary(model, scaling: Optional[RopeScaling], original_max_position_embeddings: int,
                              cp_group=None) -> DualCacheRotaryEmbedding:
    """Replace ``GPTModel.rotary_pos_emb`` (every pipeline stage has one) with the dual-cache
    module and set the attention factor in the shared model config. The one place we touch
    megatron's rotary."""
    config = model.config
    rotary = DualCacheRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        original_max_position_embeddings=original_max_position_embeddings,
        scaling=scaling,
        rotary_interleaved=config.rotary_interleaved,
        cp_group=cp_group if cp_group is not None else getattr(model.rotary_pos_emb, "cp_group", None),
    )
    device = next(model.parameters()).device
    model.rotary_pos_emb = rotary.to(device)
    set_attention_factor(config, scaling.resolved_attention_factor if scaling is not None else 1.0)
    return rotary
