"""The real SmolLM2-135M (the embedded default) on megatron-core with the dual-cache rotary gives
HF transformers' logits on real text, below the 8k window and above it with a longrope config.
Slow (minutes on CPU): run with `-m slow`."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    from longrope2.model.config import ModelConfig
    from longrope2.model.gpt import build_gpt_model
    from longrope2.model.hf_convert import load_hf_into_megatron
    from longrope2.model.pretrained import load_hf_causal_lm
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel
    from longrope2.rope.scaling import RopeScaling

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1))
    hf, tokenizer = load_hf_causal_lm("smollm2")
    cfg = ModelConfig.from_hf_config(hf.config, name="smollm2")
    scaling = RopeScaling.from_method("yarn", cfg.rope_geometry, 16384)
    ours = build_gpt_model(cfg, rope_scaling=scaling).eval()
    load_hf_into_megatron(ours, hf.state_dict(), cfg)
    # the same rope in HF: a longrope config carrying the YaRN factors and attention factor
    hf_config = type(hf.config).from_dict({**hf.config.to_dict(), **scaling.to_hf_config()})
    hf_long = type(hf)(hf_config)
    hf_long.load_state_dict(hf.state_dict())
    hf_long.eval().set_attn_implementation("sdpa")
    yield cfg, ours, hf_long, tokenizer
    destroy_parallel()


def _book_tokens(tokenizer, count):
    from longrope2.data.books import load_books

    text = "\n\n".join(book.text for book in load_books(progress=False)[:2])
    ids = tokenizer(text[: count * 8], add_special_tokens=False).input_ids
    assert len(ids) >= count
    return torch.tensor([ids[:count]])


def test_smollm2_config_is_the_documented_one(models):
    cfg = models[0]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.original_max_position_embeddings == 8192 and cfg.tie_word_embeddings


@pytest.mark.parametrize("length", [1024, 8192 + 256])
def test_real_model_logits_match_transformers(models, length):
    cfg, ours, hf_long, tokenizer = models
    tokens = _book_tokens(tokenizer, length)
    with torch.no_grad():
        theirs = hf_long(tokens).logits
        mine = ours(tokens, torch.arange(length)[None], attention_mask=None)
    assert ours.rotary_pos_emb.uses_long_factors(length) == (length > 8192)
    torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=2e-3)
    # and the model predicts real text (far better than chance: log(49152) = 10.8)
    nll = torch.nn.functional.cross_entropy(mine[0, :-1], tokens[0, 1:])
    assert nll < 4.5, nll
