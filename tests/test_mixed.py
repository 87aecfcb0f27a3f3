"""The mixed context window sampler: exact token mix, determinism, resumability; and on the tiny
megatron model, short (packed) micro-batches keep documents apart and use the ORIGINAL RoPE while
long ones use the RESCALED RoPE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from longrope2.data.mixed import DocumentStore, MixedWindowSampler
from longrope2.model.config import ModelConfig
from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel
from longrope2.rope import RopeScaling
from longrope2.rope.frequencies import inv_freq_from_factors

WINDOW, SEQ, TARGET = 64, 128, 256
LOGIT_ATOL = 2e-5
"""Packed piece vs the same document alone (fp32, different attention kernels: SDPA with an
explicit block mask vs is_causal); measured 3.7e-6 (logits of size ~1)."""


def corpus(seed: int = 0) -> DocumentStore:
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(2, WINDOW + 1, size=40)) + list(rng.integers(WINDOW + 1, 3 * SEQ, size=12)) + [1]
    return DocumentStore.from_arrays([rng.integers(0, 512, size=n) for n in lengths])


# --- the sampler on its own -------------------------------------------------------------------


def test_every_micro_batch_has_seq_length_tokens_and_the_exact_mix():
    sampler = MixedWindowSampler(corpus(), SEQ, WINDOW, short_fraction=0.3, seed=5)
    batches = [sampler[i] for i in range(100)]
    assert all(b.tokens.shape == (1, SEQ) == b.labels.shape == b.loss_mask.shape for b in batches)
    assert sum(b.is_short for b in batches) == 30
    for b in batches:
        assert int(b.cu_seqlens[0]) == 0 and int(b.cu_seqlens[-1]) == SEQ
        lengths = torch.diff(b.cu_seqlens)
        assert int(lengths.max()) == b.max_seqlen
        if b.is_short:
            assert b.max_seqlen <= WINDOW, "short micro-batches only hold documents <= the window"
            for start, n in zip(b.cu_seqlens[:-1].tolist(), lengths.tolist()):
                assert b.position_ids[0, start:start + n].tolist() == list(range(n)), "positions restart per document"
        else:
            assert b.cu_seqlens.tolist() == [0, SEQ] and b.position_ids[0].tolist() == list(range(SEQ))
        # a label is the next token of the same document, else masked
        assert torch.equal(b.labels * (b.loss_mask == 0), torch.zeros_like(b.labels))


def test_deterministic_and_resumable_from_an_index():
    a = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=7)
    b = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=7)
    run = [x.tokens for x in a.iterate(0, 40)]
    resumed = [x.tokens for x in b.iterate(25, 40)]  # state is just the index
    assert all(torch.equal(x, y) for x, y in zip(run[25:], resumed))
    other = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=8)
    assert not all(torch.equal(x, other[i].tokens) for i, x in enumerate(run))


def test_streams_cover_documents_without_loss():
    """Over one epoch of the short pool, each short document's tokens appear exactly once."""
    store = corpus()
    sampler = MixedWindowSampler(store, SEQ, WINDOW, 1.0, seed=3)
    epoch = sampler.short_stream.epoch_tokens
    batches = [sampler[i] for i in range(epoch // SEQ)]
    seen = np.concatenate([b.tokens[0].numpy() for b in batches])
    order, _ = sampler.short_stream._epoch(0)
    expected = np.concatenate([store.read(int(d), 0, int(store.lengths[d])) for d in order])
    assert np.array_equal(seen, expected[:len(seen)])
    assert all(b.is_short for b in batches)


def test_missing_pool_is_a_clear_error():
    short_only = DocumentStore.from_arrays([[1, 2, 3]] * 4)
    with pytest.raises(ValueError, match="no document is longer than the original window"):
        MixedWindowSampler(short_only, SEQ, WINDOW, 0.5)
    with pytest.raises(ValueError, match="must exceed the original window"):
        MixedWindowSampler(short_only, WINDOW, WINDOW, 0.5)  # 1.0 (pre-training) may


def test_padded_short_micro_batches_for_context_parallelism():
    """pad_multiple = 2 cp: every packed piece padded to a multiple, S tokens in all, the real
    tokens are the unpadded micro-batch's pieces in order (the tail that no longer fits is left
    out), padding is masked out of the loss; long micro-batches are untouched."""
    plain = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=4)
    padded = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=4, pad_multiple=4)
    for i in range(24):
        a, b = plain[i], padded[i]
        assert b.tokens.shape == (1, SEQ)
        if not a.is_short:
            assert b.cu_seqlens_unpadded is None and torch.equal(a.tokens, b.tokens)
            continue
        cu, real = b.cu_seqlens.tolist(), b.cu_seqlens_unpadded.tolist()
        widths, lengths = torch.diff(b.cu_seqlens), torch.diff(b.cu_seqlens_unpadded)
        assert cu[0] == 0 and cu[-1] == SEQ and bool((widths % 4 == 0).all())
        assert b.max_seqlen == int(widths.max()) <= WINDOW, "padded pieces stay within the window"
        assert bool((lengths <= widths).all()) and bool((widths - lengths < 4).all())
        skipped = SEQ - real[-1]
        assert skipped < 4 * len(lengths)
        real_tokens = torch.cat([b.tokens[0, s:s + n] for s, n in zip(cu, lengths.tolist())])
        assert torch.equal(real_tokens, a.tokens[0, :real[-1]]), "the same stream tokens, in order"
        for s, w, n in zip(cu, widths.tolist(), lengths.tolist()):
            assert b.position_ids[0, s:s + w].tolist() == list(range(w))
            assert b.loss_mask[0, s + n:s + w].sum() == 0 and b.labels[0, s + n:s + w].sum() == 0
        params = b.packed_seq_params()
        assert params.cu_seqlens_q_padded is b.cu_seqlens and params.cu_seqlens_q is b.cu_seqlens_unpadded
    # deterministic, state = index
    again = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=4, pad_multiple=4)
    assert all(torch.equal(padded[i].tokens, again[i].tokens) for i in (3, 17, 9))
    assert all(torch.equal(x.tokens, plain[i].tokens) and x.cu_seqlens_unpadded is None
               for i, x in enumerate(MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=4, pad_multiple=1)
                                     .iterate(0, 8))), "pad_multiple=1 is the unpadded layout"


def test_pad_multiple_must_divide_the_window_and_seq_length():
    with pytest.raises(ValueError, match="original window 64 not divisible by pad_multiple 3"):
        MixedWindowSampler(corpus(), 129, WINDOW, 0.5, pad_multiple=3)
    with pytest.raises(ValueError, match="seq_length 130 not divisible by pad_multiple 4"):
        MixedWindowSampler(corpus(), 130, WINDOW, 0.5, pad_multiple=4)


# --- on the model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    initialize_parallel(ParallelDims(world_size=1), seed=1234)
    from longrope2.model.gpt import build_gpt_model

    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), original_max_position_embeddings=WINDOW,
                              init_method_std=0.2)
    scaling = RopeScaling.from_method("yarn", cfg.rope_geometry, TARGET)
    built = build_gpt_model(cfg, rope_scaling=scaling, seq_length=SEQ).eval()
    yield built, scaling
    destroy_parallel()


def _forward(model, batch, capture=None):
    handle = None
    if capture is not None:
        handle = model.rotary_pos_emb.register_forward_hook(lambda m, args, out: capture.append((args, out)))
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, attention_mask=None, packed_seq_params=batch.packed_seq_params())
    if handle:
        handle.remove()
    return out[0]  # [S, vocab]


def _angles(inv_freq: torch.Tensor, n: int) -> torch.Tensor:
    freqs = torch.outer(torch.arange(n, dtype=inv_freq.dtype), inv_freq)
    return torch.cat([freqs, freqs], dim=-1)


def test_short_micro_batch_documents_cannot_see_each_other(model):
    model, _ = model
    sampler = MixedWindowSampler(corpus(), SEQ, WINDOW, 1.0, seed=1)
    batch = sampler[2]
    pieces = list(zip(batch.cu_seqlens[:-1].tolist(), torch.diff(batch.cu_seqlens).tolist()))
    assert len(pieces) >= 3
    logits = _forward(model, batch)
    # each piece alone (an ordinary causal sequence) gives the same logits as inside the pack
    for start, n in pieces:
        alone = model(batch.tokens[:, start:start + n], torch.arange(n)[None], attention_mask=None)[0]
        torch.testing.assert_close(logits[start:start + n], alone.detach(), atol=LOGIT_ATOL, rtol=0)
    # perturb one document: only its own logits move
    victim_start, victim_n = pieces[1]
    perturbed = dataclasses.replace(batch, tokens=batch.tokens.clone())
    perturbed.tokens[0, victim_start:victim_start + victim_n] = (perturbed.tokens[0, victim_start:victim_start + victim_n] + 1) % 512
    moved = _forward(model, perturbed)
    inside = torch.zeros(SEQ, dtype=torch.bool)
    inside[victim_start:victim_start + victim_n] = True
    assert torch.equal(moved[~inside], logits[~inside]), "other documents' logits are bit-identical"
    assert (moved[inside] - logits[inside]).abs().max() > 1e-2


def test_short_uses_original_rope_and_long_the_rescaled(model):
    """The angles megatron receives: the original set for a packed short micro-batch, the
    rescaled one for a long one; swapping the factor sets moves only the long logits. (The
    attention factor applies to both; ``test_model_vs_hf`` checks it against transformers.)"""
    model, scaling = model
    sampler = MixedWindowSampler(corpus(), SEQ, WINDOW, 0.5, seed=2)
    short = next(b for b in sampler.iterate() if b.is_short)
    long = next(b for b in sampler.iterate() if not b.is_short)
    original = inv_freq_from_factors(scaling.rotary_dim, scaling.rope_theta, [1.0] * (scaling.rotary_dim // 2))
    assert not torch.allclose(original, scaling.long_inv_freq), "the test needs factors != 1"

    seen = []
    short_logits = _forward(model, short, seen)
    (args, angles), = seen
    assert args[0] == short.max_seqlen <= WINDOW, "megatron passes the longest packed document"
    torch.testing.assert_close(angles[:, 0, 0, :], _angles(original, short.max_seqlen), atol=0, rtol=0)

    seen.clear()
    long_logits = _forward(model, long, seen)
    (args, angles), = seen
    assert args[0] == SEQ
    torch.testing.assert_close(angles[:, 0, 0, :], _angles(scaling.long_inv_freq, SEQ), atol=0, rtol=0)

    # end to end: dropping the rescaling leaves short logits untouched and moves long ones
    rotary = model.rotary_pos_emb
    rotary.set_scaling(None)
    try:
        assert torch.equal(_forward(model, short), short_logits)
        assert (_forward(model, long) - long_logits).abs().max() > 1e-3
    finally:
        rotary.set_scaling(scaling)
