"""Greedy generation across the real SmolLM2-135M's 8k window with the searched LongRoPE2 factors
(results/smollm2_16k_h100/best.json): a passkey prompt of 8,190 tokens, so the answer starts
before position 8192 and ends after it. With the one-time KV-cache recompute the passkey comes
out whole; transformers' LlamaForCausalLM.generate keeps its short-factor cache past the window
and breaks the answer at the crossing. Slow (7.6 min on 2 busy CPU cores): run with `-m slow`.
benchmarks/generation_across_window.py records more samples and the timings."""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

FACTORS = Path(__file__).resolve().parents[1] / "results" / "smollm2_16k_h100" / "best.json"


def test_passkey_across_the_window():
    from longrope2.data import tokenize
    from longrope2.data.books import load_books
    from longrope2.eval.generate import greedy_generate
    from longrope2.eval.model import RopeSwitch, load_model, resolve_rope
    from longrope2.eval.scoring import exact_match
    from longrope2.eval.tasks import Corpus, TaskBuilder

    torch.set_num_threads(1)
    model, hf_tokenizer = load_model("smollm2")
    switch = RopeSwitch(model)
    switch.apply(resolve_rope(f"longrope2={FACTORS}", switch.geometry, None))
    window = switch.geometry.original_max_position_embeddings
    wrapped = tokenize.from_hf(hf_tokenizer, "smollm2")
    builder = TaskBuilder(Corpus(wrapped.encode, load_books(progress=False), wrapped.bos_token_id), seed=1234,
                          max_new_tokens={"passkey": 8})
    sample = builder.build("passkey", window - 2 + 8, 1, depth=0.5)
    prompt = torch.tensor(sample.prompt)
    assert len(prompt) == window - 2

    ours = greedy_generate(model, prompt, 8)
    text = hf_tokenizer.decode(ours.new_tokens, skip_special_tokens=True)
    assert ours.switched_at == window + 1
    assert exact_match(text, sample.references) == 1.0, (text, sample.references)

    stale = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                           max_new_tokens=8, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert stale[:2] == ours.new_tokens[:2], "identical before the crossing"
    assert stale != ours.new_tokens, "a stale cache changes the continuation"
