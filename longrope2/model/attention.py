"""Core attention for megatron's local layer spec, on torch's ``scaled_dot_product_attention``.

Megatron's own ``DotProductAttention`` materialises ``[b, heads, s, s]`` scores (10 GB per
layer for SmolLM2 at 16k), refuses context parallelism and refuses packed (THD) input. This
module is its drop-in (same constructor and forward) with what LongRoPE2 needs off the
TransformerEngine path:

* causal attention with GQA, through SDPA's fused kernels (flash on Hopper, a blocked kernel on
  CPU) when no explicit mask is needed;
* packed THD input: a block-diagonal causal mask from ``cu_seqlens`` so that no token sees
  another document;
* context parallelism: K and V are all-gathered over the CP group and the causal mask is built
  from global positions, the chunks laid out as megatron slices them (rank r holds chunks r and
  2cp-1-r of 2cp);
* packed THD input under context parallelism, in TransformerEngine's layout: every document is
  padded to a multiple of 2cp and rank r holds chunks r and 2cp-1-r of EACH document
  (``thd_cp_indices``); K and V are all-gathered, and each query's and key's index in the global
  packed sequence (hence its document, from the padded ``cu_seqlens``) gives the causal +
  same-document mask. Padding sits at the end of its document, so no real token sees it.

On GPU the TransformerEngine spec replaces it (TE's fused attention, CP via p2p/a2a).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradients over the group and keeps
    this rank's slice. (``torch.distributed.nn.functional.all_gather`` returns wrong gradients on
    gloo when incoming gradients are non-contiguous.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(ctx.size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=0)[ctx.rank], None


def cp_chunk_positions(local_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of
    ``2*cp_size`` (megatron's load-balanced CP layout)."""
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def thd_cp_indices(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Indices into the packed (global) THD sequence of the tokens CP rank ``cp_rank`` holds, in
    its local order: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``2*cp_size`` of every
    sequence, sequence by sequence (TransformerEngine's ``thd_get_partitioned_indices``).
    ``cu_seqlens`` are the padded boundaries: every length must divide by ``2*cp_size``."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % (2 * cp_size)).any()):
        raise ValueError(f"packed THD lengths {lengths.tolist()} are not all multiples of 2*cp={2 * cp_size}: "
                         "pad each document (the sampler's pad_multiple) before splitting it over CP")
    chunk = lengths // (2 * cp_size)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), 2 * chunk)
    local_starts = torch.cumsum(2 * chunk, 0) - 2 * chunk
    within = torch.arange(seq.numel(), device=cu.device) - local_starts[seq]  # 0 .. 2 chunk - 1
    c = chunk[seq]
    first = within < c
    offset = torch.where(first, cp_rank * c + within, (2 * cp_size - 1 - cp_rank) * c + within - c)
    return cu[:-1][seq] + offset


class SDPAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` (causal only)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention is causal only, got {attn_mask_type}")
        self.layer_number = layer_number
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None

    def _cp_group(self):
        group = self.cp_group or parallel_state.get_context_parallel_group(check_initialized=False)
        return group if group is not None and dist.get_world_size(group) > 1 else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:
            # [t, heads, d] -> [1, t, heads, d]: one sequence with a block-diagonal mask
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        cp_group = self._cp_group()
        if cp_group is not None:
            key = _AllGatherSequence.apply(key, cp_group)
            value = _AllGatherSequence.apply(value, cp_group)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

        mask = None
        if packed:
            # the padded layout when there is one (megatron's rotary reads the same)
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            if cp_group is None:
                mask = self._document_mask(cu, q.shape[2], q.device)
            else:
                mask = self._cp_document_mask(cu, q.shape[2], cp_group, q.device)
        elif cp_group is not None:
            cp_rank, cp_size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
            q_pos = cp_chunk_positions(q.shape[2], cp_rank, cp_size, q.device)
            k_pos = torch.cat([cp_chunk_positions(q.shape[2], r, cp_size, q.device) for r in range(cp_size)])
            mask = q_pos[:, None] >= k_pos[None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
        )
        out = out.permute(2, 0, 1, 3)  # [s, b, heads, d]
        if packed:
            return out.squeeze(1).reshape(out.shape[0], -1)  # [t, heads * d]
        return out.reshape(out.shape[0], out.shape[1], -1)  # [s, b, heads * d]

    @staticmethod
    def _document_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
        """Causal within each packed document, nothing across documents."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        if doc.numel() != total:
            raise ValueError(f"cu_seqlens cover {doc.numel()} tokens, the packed sequence has {total}")
        index = torch.arange(total, device=device)
        return (doc[:, None] == doc[None, :]) & (index[:, None] >= index[None, :])

    @staticmethod
    def _cp_document_mask(cu_seqlens: torch.Tensor, local: int, cp_group, device) -> torch.Tensor:
        """THD under CP: queries are this rank's tokens, keys every rank's (all-gather order);
        causal within each document by global index, nothing across documents."""
        cu = cu_seqlens.to(device)
        cp_rank, cp_size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
        q_index = thd_cp_indices(cu, cp_rank, cp_size)
        if q_index.numel() != local:
            raise ValueError(f"cu_seqlens cover {int(cu[-1])} tokens, {q_index.numel()} on CP rank {cp_rank}; "
                             f"the local packed sequence has {local}")
        k_index = torch.cat([thd_cp_indices(cu, r, cp_size) for r in range(cp_size)])
        bounds = cu[1:].to(torch.int64)
        q_doc = torch.searchsorted(bounds, q_index, right=True)
        k_doc = torch.searchsorted(bounds, k_index, right=True)
        return (q_doc[:, None] == k_doc[None, :]) & (q_index[:, None] >= k_index[None, :])
