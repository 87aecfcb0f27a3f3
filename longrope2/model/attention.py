"""Core attention for megatron's local layer spec, on torch's ``scaled_dot_product_attention``.

Megatron's own ``DotProductAttention`` materialises ``[b, heads, s, s]`` scores (10 GB per
layer for SmolLM2 at 16k), refuses context parallelism and refuses packed (THD) input. This
module is its drop-in (same constructor and forward) with what LongRoPE2 needs off the
TransformerEngine path, and it never builds an ``S x S`` mask, so SDPA always runs a fused
causal kernel (flash on Hopper, a blocked flash kernel on CPU) in O(S) memory:

* long sequences: one causal SDPA call, grouped-query K/V through SDPA's ``enable_gqa`` (no
  ``repeat_interleave`` copies);
* packed THD input: attention per document (``cu_seqlens``), documents of equal length batched
  into one causal call, so no token sees another document;
* context parallelism: K and V are all-gathered over the CP group and put back in global order;
  each of this rank's two chunks (r and 2cp-1-r of 2cp, megatron's layout) attends causally to
  the keys up to its own end (a lower-right-aligned causal mask: TransformerEngine's and
  flash-attn's convention; ``causal_lower_right`` on CUDA, a square causal call over the
  front-padded queries on CPU);
* packed THD input under context parallelism, in TransformerEngine's layout: every document is
  padded to a multiple of 2cp and rank r holds chunks r and 2cp-1-r of EACH document
  (``thd_cp_indices``); per document as above. Padding sits at the end of its document, so no
  real token sees it.

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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal SDPA over ``[b, heads, m, d]`` queries and ``[b, groups, n, d]`` keys/values with
    ``n >= m``: query i sits at key position ``n - m + i`` (lower-right alignment), so it sees
    keys ``0 .. n - m + i``. No mask tensor is built: ``is_causal`` when square, torch's
    ``causal_lower_right`` bias on CUDA (flash / memory-efficient kernels), and on CPU a square
    causal call over queries front-padded with ``n - m`` zero rows, whose outputs are dropped (so
    their gradients are zero)."""
    m, n = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if m == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if m > n:
        raise ValueError(f"causal attention with {m} queries over {n} keys: need keys >= queries")
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(m, n), dropout_p=dropout,
                                              scale=scale, enable_gqa=gqa)
    padded = torch.cat([q.new_zeros(*q.shape[:-2], n - m, q.shape[-1]), q], dim=-2)
    out = F.scaled_dot_product_attention(padded, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return out[..., n - m:, :]


def _segments(cu_seqlens: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each packed document, checked against the packed length."""
    bounds = cu_seqlens.tolist()
    if bounds[-1] != total or bounds[0] != 0:
        raise ValueError(f"cu_seqlens cover {bounds[-1] - bounds[0]} tokens, the packed sequence has {total}")
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


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
        if packed:  # [t, heads, d] -> [t, 1, heads, d]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        cp_group = self._cp_group()
        if cp_group is not None:
            key = _AllGatherSequence.apply(key, cp_group)
            value = _AllGatherSequence.apply(value, cp_group)
        dropout = self.dropout if self.training else 0.0
        if packed:
            # the padded layout when there is one (megatron's rotary reads the same)
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            if cp_group is None:
                out = self._packed(query, key, value, cu, dropout)
            else:
                out = self._packed_cp(query, key, value, cu, cp_group, dropout)
            return out.reshape(out.shape[0], -1)  # [t, heads * d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if cp_group is None:
            out = causal_attention(q, k, v, self.softmax_scale, dropout)
        else:
            out = self._long_cp(q, k, v, cp_group, dropout)
        out = out.permute(2, 0, 1, 3)  # [s, b, heads, d]
        return out.reshape(out.shape[0], out.shape[1], -1)  # [s, b, heads * d]

    def _packed(self, query, key, value, cu_seqlens, dropout):
        """Each document attends causally to itself; documents of one length share a call."""
        segments = _segments(cu_seqlens, query.shape[0])
        by_length: dict[int, list[int]] = {}
        for start, length in segments:
            by_length.setdefault(length, []).append(start)
        if len(segments) == 1:
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            return causal_attention(q, k, v, self.softmax_scale, dropout).permute(2, 0, 1, 3)[:, 0]
        out = query.new_empty(query.shape[0], query.shape[2], value.shape[3])
        for length, starts in by_length.items():
            index = (torch.tensor(starts, device=query.device)[:, None]
                     + torch.arange(length, device=query.device)).reshape(-1)
            # [n * L, 1, h, d] -> [n, h, L, d]
            q, k, v = (x.index_select(0, index).reshape(len(starts), length, x.shape[2], x.shape[3]).transpose(1, 2)
                       for x in (query, key, value))
            part = causal_attention(q, k, v, self.softmax_scale, dropout)  # [n, h, L, d]
            out = out.index_copy(0, index, part.transpose(1, 2).reshape(-1, part.shape[1], part.shape[3]))
        return out

    def _long_cp(self, q, k, v, cp_group, dropout):
        """Chunks r and 2cp-1-r of one sequence; K/V all-gathered in rank order."""
        cp_rank, cp_size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
        local = q.shape[2]
        chunk = local // 2
        order = _global_chunk_order(cp_size, chunk, q.device)
        k, v = k.index_select(2, order), v.index_select(2, order)
        outs = []
        for half, g in enumerate((cp_rank, 2 * cp_size - 1 - cp_rank)):
            end = (g + 1) * chunk
            outs.append(causal_attention(q[:, :, half * chunk:(half + 1) * chunk], k[:, :, :end], v[:, :, :end],
                                         self.softmax_scale, dropout))
        return torch.cat(outs, dim=2)

    def _packed_cp(self, query, key, value, cu_seqlens, cp_group, dropout):
        """THD under CP: per document, this rank's two chunks against the document's keys in
        global order (all-gathered, TE's per-document chunk layout)."""
        cp_rank, cp_size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
        cu = cu_seqlens.to(query.device)
        local_index = thd_cp_indices(cu, cp_rank, cp_size)
        if local_index.numel() != query.shape[0]:
            raise ValueError(f"cu_seqlens cover {int(cu[-1])} tokens, {local_index.numel()} on CP rank {cp_rank}; "
                             f"the local packed sequence has {query.shape[0]}")
        # where each global token sits in the all-gathered keys: rank-major, each rank's local order
        gathered = torch.cat([thd_cp_indices(cu, r, cp_size) for r in range(cp_size)])
        where = torch.empty_like(gathered)
        where[gathered] = torch.arange(gathered.numel(), device=gathered.device)
        parts = []  # in local order: document by document, chunk r then chunk 2cp-1-r
        local_start = 0
        for start, length in _segments(cu, int(cu[-1])):
            chunk = length // (2 * cp_size)
            keys = where[start:start + length]
            k, v = (x.index_select(0, keys).permute(1, 2, 0, 3) for x in (key, value))  # [1, g, L, d]
            for half, g in enumerate((cp_rank, 2 * cp_size - 1 - cp_rank)):
                rows = slice(local_start + half * chunk, local_start + (half + 1) * chunk)
                q = query[rows].permute(1, 2, 0, 3)  # [1, h, c, d]
                end = (g + 1) * chunk
                part = causal_attention(q, k[:, :, :end], v[:, :, :end], self.softmax_scale, dropout)
                parts.append(part.permute(2, 0, 1, 3)[:, 0])  # [c, h, d]
            local_start += 2 * chunk
        return torch.cat(parts, dim=0)


def _global_chunk_order(cp_size: int, chunk: int, device) -> torch.Tensor:
    """Index into the rank-ordered all-gather (rank r: chunks r, 2cp-1-r) giving global order."""
    slot = {}
    for r in range(cp_size):
        slot[r], slot[2 * cp_size - 1 - r] = 2 * r, 2 * r + 1
    return torch.cat([torch.arange(chunk, device=device) + slot[g] * chunk for g in range(2 * cp_size)])
