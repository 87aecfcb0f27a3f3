"""A tiny LLaMA / Phi-3 built on megatron-core with the dual-cache rotary gives the logits of
HF transformers' ``longrope`` model, below and above the original window, full and partial rotary."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from longrope2.model.config import ModelConfig
from longrope2.model.hf_convert import load_hf_into_megatron, megatron_to_hf
from factories import ramp_longrope2_scaling

from longrope2.rope import RopeScaling
from longrope2.rope.rotary import DualCacheRotaryEmbedding

ORIGINAL, TARGET = 64, 256


@pytest.fixture(scope="module")
def single_process():
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1), seed=1234)
    yield
    destroy_parallel()


def _tiny(rotary_percent: float, architecture: str) -> ModelConfig:
    base = ModelConfig.from_name("tiny")
    return dataclasses.replace(base, original_max_position_embeddings=ORIGINAL, rotary_percent=rotary_percent,
                               hf_architecture=architecture)  # GQA (4 heads, 2 KV heads) in both layouts


def _scaling(cfg: ModelConfig) -> RopeScaling:
    return ramp_longrope2_scaling(cfg, ORIGINAL, TARGET)


@pytest.mark.parametrize("rotary_percent, architecture", [(1.0, "LlamaForCausalLM"), (0.75, "Phi3ForCausalLM")])
def test_logits_match_transformers_longrope(single_process, rotary_percent, architecture):
    from longrope2.model.gpt import build_gpt_model

    cfg = _tiny(rotary_percent, architecture)
    scaling = _scaling(cfg)
    hf_fields = {**cfg.to_hf_config(), **scaling.to_hf_config(), "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None, "attn_implementation": "eager"}
    hf_cls, config_cls = (Phi3ForCausalLM, Phi3Config) if architecture.startswith("Phi3") else (LlamaForCausalLM, LlamaConfig)
    torch.manual_seed(0)
    hf = hf_cls(config_cls(**hf_fields)).eval()
    # random norms too, so a swapped norm key cannot hide
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    model = build_gpt_model(cfg, rope_scaling=scaling).eval()
    assert isinstance(model.rotary_pos_emb, DualCacheRotaryEmbedding)
    load_hf_into_megatron(model, hf.state_dict(), cfg)

    # the weights map back to HF unchanged (both layouts, LLaMA and Phi-3's fused one)
    back = dict(megatron_to_hf(model.state_dict(), cfg))
    for key, tensor in hf.state_dict().items():
        if key != "lm_head.weight" or not cfg.tie_word_embeddings:
            assert torch.equal(back[key], tensor), key

    for seq_len in (ORIGINAL // 2, ORIGINAL, ORIGINAL + 8, TARGET):
        tokens = torch.randint(0, cfg.vocab_size, (2, seq_len))
        positions = torch.arange(seq_len).expand(2, -1)
        with torch.no_grad():
            ours = model(tokens, positions, attention_mask=None)
            theirs = hf(tokens).logits
        assert model.rotary_pos_emb.uses_long_factors(seq_len) == (seq_len > ORIGINAL)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=lambda m: f"seq_len {seq_len}: {m}")


@pytest.mark.parametrize("rotary_percent, architecture", [(1.0, "LlamaForCausalLM"), (0.75, "Phi3ForCausalLM")])
def test_packed_short_documents_match_transformers_with_the_attention_factor(single_process, rotary_percent,
                                                                             architecture):
    """Short documents packed into one THD micro-batch (as the mixed window trainer feeds them)
    each give transformers' logits for that document alone: the original angles and the
    attention factor (here sqrt(1 + ln 4 / ln 64) = 1.155, not 1) on cos and sin, as HF applies
    it below the window too. With the factor wrongly left out, the logits would differ."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from longrope2.model.gpt import build_gpt_model
    from longrope2.rope.rotary import set_attention_factor

    cfg = _tiny(rotary_percent, architecture)
    scaling = _scaling(cfg)
    assert scaling.resolved_attention_factor == pytest.approx((1 + 1 / 3) ** 0.5)  # ln 4 / ln 64 = 1/3
    hf_fields = {**cfg.to_hf_config(), **scaling.to_hf_config(), "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None, "attn_implementation": "eager"}
    hf_cls, config_cls = (Phi3ForCausalLM, Phi3Config) if architecture.startswith("Phi3") else (LlamaForCausalLM, LlamaConfig)
    torch.manual_seed(2)
    hf = hf_cls(config_cls(**hf_fields)).eval()
    model = build_gpt_model(cfg, rope_scaling=scaling).eval()
    load_hf_into_megatron(model, hf.state_dict(), cfg)

    lengths = [ORIGINAL, 9, ORIGINAL // 2, 23]  # one at the window's edge: still the short set
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    tokens = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def packed_logits():
        with torch.no_grad():
            return model(tokens, positions, attention_mask=None, packed_seq_params=params)[0]

    ours = packed_logits()
    for start, n in zip(cu[:-1].tolist(), lengths):
        with torch.no_grad():
            theirs = hf(tokens[:, start:start + n]).logits[0]
        torch.testing.assert_close(ours[start:start + n], theirs, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"document of {n} tokens: {m}")
    set_attention_factor(model.config, 1.0)
    try:
        assert (packed_logits() - ours).abs().max() > 1e-3, "the attention factor reaches short documents"
    finally:
        set_attention_factor(model.config, scaling.resolved_attention_factor)
