"""Greedy generation across the original window against transformers (Phi-3's cache drop) and
against cache-free decoding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from longrope2.eval.generate import greedy_generate, longrope_window
from longrope2.rope import RopeGeometry, RopeScaling

WINDOW, TARGET, HEAD_DIM = 32, 128, 16


def _longrope(rotary_percent=1.0) -> dict:
    geometry = RopeGeometry(HEAD_DIM, 10000.0, WINDOW, rotary_percent)
    return RopeScaling.from_method("yarn", geometry, TARGET).to_hf_config("rope_parameters")


def _model(cls, config_cls, rope: dict | None, rotary_percent=1.0, seed=0):
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=96, vocab_size=97, max_position_embeddings=TARGET,
                  # a large init spreads the logits, so greedy tokens depend on the RoPE in use
                  initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if config_cls is LlamaConfig:
        fields["head_dim"] = HEAD_DIM
    if rotary_percent != 1.0:
        fields["partial_rotary_factor"] = rotary_percent
    if rope:
        fields.update(rope)
    return cls(config_cls(**fields)).eval()


def _prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _uncached_greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Re-run the whole sequence every step: HF picks short or long factors by its length."""
    tokens, new = prompt, []
    for _ in range(steps):
        new.append(model(tokens).logits[0, -1].argmax().item())
        tokens = torch.cat([tokens, torch.tensor([[new[-1]]])], dim=1)
    return new


@pytest.mark.parametrize("prompt_len", [WINDOW - 6, WINDOW])
def test_matches_transformers_phi3_cache_drop(prompt_len):
    model = _model(Phi3ForCausalLM, Phi3Config, _longrope(0.75), rotary_percent=0.75)
    assert longrope_window(model.config) == WINDOW
    prompt = _prompt(prompt_len)
    steps = 14
    ours = greedy_generate(model, prompt, steps)
    hf = model.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                        attention_mask=torch.ones_like(prompt))
    assert ours.new_tokens == hf[0, prompt_len:].tolist()
    assert ours.switched_at == WINDOW + 1
    assert ours.new_tokens == _uncached_greedy(model, prompt, steps)


def test_llama_recomputes_once_and_equals_uncached_decoding():
    model = _model(LlamaForCausalLM, LlamaConfig, _longrope())
    prompt = _prompt(WINDOW - 4, seed=3)
    steps = 20
    ours = greedy_generate(model, prompt, steps)
    assert ours.switched_at == WINDOW + 1 and ours.recompute_s > 0
    reference = _uncached_greedy(model, prompt, steps)
    assert ours.new_tokens == reference
    # without the recompute the cache keeps short-factor keys: the continuation is another one
    stale = model.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                           attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()
    assert stale[:WINDOW - prompt.shape[1] + 1] == reference[:WINDOW - prompt.shape[1] + 1]
    assert stale != reference


def test_prompt_beyond_window_and_plain_rope_never_switch():
    long_model = _model(LlamaForCausalLM, LlamaConfig, _longrope())
    prompt = _prompt(WINDOW + 5, seed=4)
    out = greedy_generate(long_model, prompt, 6)
    assert out.switched_at is None and out.new_tokens == _uncached_greedy(long_model, prompt, 6)

    plain = _model(LlamaForCausalLM, LlamaConfig, None)
    assert longrope_window(plain.config) is None
    prompt = _prompt(WINDOW - 2, seed=5)
    out = greedy_generate(plain, prompt, 8)
    assert out.switched_at is None and out.new_tokens == _uncached_greedy(plain, prompt, 8)


def test_stops_at_eos_and_checks_its_input():
    model = _model(LlamaForCausalLM, LlamaConfig, _longrope())
    prompt = _prompt(10, seed=6)
    free = greedy_generate(model, prompt, 8).new_tokens
    stop = free[2]
    out = greedy_generate(model, prompt, 8, eos_token_id=stop)
    assert out.new_tokens == free[:free.index(stop) + 1]
    with pytest.raises(ValueError, match="one sequence"):
        greedy_generate(model, torch.cat([prompt, prompt]), 4)
    with pytest.raises(ValueError, match="tokenizer"):
        greedy_generate(model, prompt, 4, stop_strings=["x"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompt, 0)


@pytest.mark.parametrize("rope", [None, "longrope"])
def test_batched_generation_equals_one_prompt_at_a_time(rope):
    """Left-padded batches (prompts of different lengths; below, across and beyond the window
    for a longrope model) give each row the tokens greedy_generate gives it alone."""
    from longrope2.eval.generate import greedy_generate_batch

    model = _model(LlamaForCausalLM, LlamaConfig, _longrope() if rope else None)
    lengths = [9, 17, 12, WINDOW - 10, WINDOW - 3, WINDOW + 4, WINDOW + 9]
    prompts = [_prompt(n, seed=10 + n)[0].tolist() for n in lengths]
    steps = 6
    batched = greedy_generate_batch(model, prompts, steps, pad_token_id=0)
    single = [greedy_generate(model, torch.tensor(p), steps) for p in prompts]
    assert [b.new_tokens for b in batched] == [s.new_tokens for s in single]
    assert [b.switched_at for b in batched] == [s.switched_at for s in single]
    if rope:  # WINDOW - 3 crosses the window: recomputed once, alone
        assert batched[4].switched_at == WINDOW + 1
    # early stops: a row ending at its eos keeps exactly its own tokens
    stop = single[0].new_tokens[2]
    batched = greedy_generate_batch(model, prompts[:3], steps, pad_token_id=0, eos_token_id=stop)
    for b, p in zip(batched, prompts[:3]):
        assert b.new_tokens == greedy_generate(model, torch.tensor(p), steps, eos_token_id=stop).new_tokens
    with pytest.raises(ValueError, match="non-empty"):
        greedy_generate_batch(model, [[]], 2, pad_token_id=0)


def test_equal_length_batch_runs_unmasked_and_equals_one_at_a_time():
    """Rows of one length go through the model without an attention mask (SDPA's causal kernel)
    and still give each row its own greedy tokens."""
    from longrope2.eval.generate import greedy_generate_batch

    model = _model(LlamaForCausalLM, LlamaConfig, None)
    prompts = [_prompt(20, seed=s)[0].tolist() for s in (30, 31, 32)]
    masks = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")),
                                                 with_kwargs=True)
    try:
        batched = greedy_generate_batch(model, prompts, 5, pad_token_id=0)
    finally:
        hook.remove()
    assert all(m is None for m in masks) and len(masks) == 5
    assert [b.new_tokens for b in batched] == [greedy_generate(model, torch.tensor(p), 5).new_tokens for p in prompts]
