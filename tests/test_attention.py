"""Our SDPA core attention against megatron's own DotProductAttention, and its packed-document mask."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from longrope2.model.attention import SDPAttention, thd_cp_indices

HEADS, GROUPS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module")
def config():
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1), seed=3)
    yield TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=HEAD_DIM, masked_softmax_fusion=False,
                            attention_dropout=0.0)
    destroy_parallel()


def _qkv(seq, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    return q, k, v


def test_matches_megatron_dot_product_attention_with_gqa(config):
    ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(48)
    out_ours = ours(q, k, v, None)
    grads_ours = torch.autograd.grad(out_ours.square().sum(), (q, k, v))
    out_theirs = theirs(q, k, v, None)
    grads_theirs = torch.autograd.grad(out_theirs.square().sum(), (q, k, v))
    assert out_ours.shape == out_theirs.shape == (48, 2, HEADS * HEAD_DIM)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_documents_do_not_see_each_other(config):
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    lengths = [5, 11, 8]
    q, k, v = (x[:, 0] for x in _qkv(sum(lengths), batch=1, seed=1))  # THD: [t, heads, d]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    packed = attention(q, k, v, None, packed_seq_params=params)
    assert packed.shape == (sum(lengths), HEADS * HEAD_DIM)
    # each document alone, as its own causal sequence
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = attention(*(x[start:end, None] for x in (q, k, v)), None)[:, 0]
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-6)
    # and a token of document 2 changes nothing in documents 1 and 3
    k2 = k.detach().clone()
    k2[7] += 10.0
    moved = attention(q, k2, v, None, packed_seq_params=params)
    assert torch.equal(moved[:5], packed[:5]) and torch.equal(moved[16:], packed[16:])
    assert not torch.allclose(moved[7:16], packed[7:16])


def test_rejects_bad_cu_seqlens(config):
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = (x[:, 0] for x in _qkv(10, batch=1))
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    with pytest.raises(ValueError, match="cover 12 tokens, the packed sequence has 10"):
        attention(q, k, v, None, packed_seq_params=params)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_thd_cp_indices_are_chunks_r_and_mirror_of_every_document(cp):
    """TransformerEngine's thd_get_partitioned_indices layout: per document of padded length L,
    rank r keeps [r c, (r+1) c) and [(2cp-1-r) c, (2cp-r) c), c = L / 2cp; the ranks tile it."""
    lengths = [8 * cp, 2 * cp, 6 * cp, 2 * cp]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seen = []
    for r in range(cp):
        expected = []
        for start, n in zip(cu[:-1].tolist(), lengths):
            c = n // (2 * cp)
            expected += list(range(start + r * c, start + (r + 1) * c))
            expected += list(range(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c))
        got = thd_cp_indices(cu, r, cp).tolist()
        assert got == expected
        seen += got
    assert sorted(seen) == list(range(int(cu[-1])))
    with pytest.raises(ValueError, match="not all multiples of 2\\*cp"):
        thd_cp_indices(torch.tensor([0, 8 * cp + 1], dtype=torch.int32), 0, max(cp, 2))


def _dense_reference(q, k, v, allowed, scale):
    """Attention written out with an explicit boolean mask ([s, b, heads, d] in, [s, b, heads*d]
    out): what the packed and CP paths replaced; K/V heads repeated for GQA."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


@pytest.mark.parametrize("lengths", [[5, 11, 8], [8, 8, 8, 3, 8], [24]])
def test_packed_per_document_equals_dense_block_diagonal_mask(config, lengths):
    """Packed THD attention (per document, equal lengths batched) equals attention with the
    block-diagonal causal S x S mask it replaced, forward and grads, fp32, GQA."""
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    total = sum(lengths)
    q, k, v = (x[:, 0].double().detach().requires_grad_() for x in _qkv(total, batch=1, seed=4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    ours = attention(q, k, v, None, packed_seq_params=params)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(total)
    allowed = (doc[:, None] == doc[None, :]) & (index[:, None] >= index[None, :])
    reference = _dense_reference(*(x[:, None] for x in (q, k, v)), allowed, attention.softmax_scale)[:, 0]
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), (q, k, v)),
                    torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("queries,keys", [(6, 6), (4, 10), (1, 7)])
def test_causal_attention_is_lower_right_aligned(queries, keys):
    """``causal_attention`` with fewer queries than keys: query i sees keys 0..keys-queries+i
    (TransformerEngine's and flash-attn's alignment), equal to the dense mask, grads included."""
    from longrope2.model.attention import causal_attention

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, HEADS, queries, HEAD_DIM, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, GROUPS, keys, HEAD_DIM, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, GROUPS, keys, HEAD_DIM, generator=g, dtype=torch.float64, requires_grad=True)
    ours = causal_attention(q, k, v, scale=0.25)
    allowed = torch.arange(queries)[:, None] + (keys - queries) >= torch.arange(keys)[None, :]
    as_sbhd = lambda x: x.permute(2, 0, 1, 3)  # noqa: E731
    reference = _dense_reference(as_sbhd(q), as_sbhd(k), as_sbhd(v), allowed, 0.25)
    torch.testing.assert_close(as_sbhd(ours).reshape(reference.shape), reference, rtol=1e-9, atol=1e-9)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)),
                    torch.autograd.grad(reference.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="need keys >= queries"):
        causal_attention(k.repeat(1, 2, 1, 1), q[:, :, :1], q[:, :, :1], scale=0.25)
