"""Needle/book PPL with the LM head only at scored tokens == full logits; a rope config swapped
onto a loaded model == a fresh load of that config.json."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eval_fixtures import TARGET, WINDOW, books, save_tiny, tiny_model, tokenizer
from longrope2.data import tokenize
from longrope2.data.needle import make_needle_document
from longrope2.eval.model import RopeSwitch, resolve_rope
from longrope2.eval.ppl import book_window_nll, needle_nll, token_nll


def _reference_nll(model, tokens, scored):
    logits = model(torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -sum(logp[i - 1, tokens[i]].item() for i in scored)


@pytest.fixture(scope="module")
def encoded():
    wrapped = tokenize.from_hf(tokenizer())
    return wrapped.encode, wrapped.encode(books()[0][1])


@pytest.mark.parametrize("rope", ["original", "yarn"])
@pytest.mark.parametrize("length", [WINDOW, WINDOW * 3])
def test_needle_and_book_ppl_equal_full_logits(encoded, rope, length):
    encode, hay = encoded
    model = tiny_model()
    switch = RopeSwitch(model)
    switch.apply(resolve_rope(rope, switch.geometry, TARGET))
    doc = make_needle_document(encode, hay, length, np.random.default_rng(0))
    nll, count = needle_nll(model, doc)
    assert count == length - doc.answer_start
    ref = _reference_nll(model, doc.tokens, range(doc.answer_start, length))
    assert nll == pytest.approx(ref, rel=1e-5)
    window = hay[1000:1000 + length]
    nll, count = book_window_nll(model, window, 32)
    assert count == 32
    assert nll == pytest.approx(_reference_nll(model, window, range(length - 32, length)), rel=1e-5)
    with pytest.raises(ValueError, match="scored positions"):
        token_nll(model, window, [0])


@pytest.mark.parametrize("spec", ["original", "pi", "ntk", "yarn", "best"])
def test_swapped_rope_equals_a_fresh_load(tmp_path, spec):
    folder = save_tiny(tmp_path / "model", seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = torch.tensor([tokenize.from_hf(tokenizer()).encode(books()[1][1])[:WINDOW * 2]])
    before = model(ids).logits
    switch = RopeSwitch(model)
    if spec == "best":  # a search result file
        best = tmp_path / "best.json"
        s = TARGET / WINDOW
        long = [s ** (i / 4) for i in range(4)] + [s * 1.5] * 4
        best.write_text(json.dumps({"target_length": TARGET, "original_length": WINDOW, "critical_dim": 4,
                                    "long_factor": long, "attention_factor": 1.1}))
        spec = f"searched={best}"
    rope = resolve_rope(spec, switch.geometry, TARGET)
    switch.apply(rope)
    swapped = model(ids).logits
    config = json.loads((folder / "config.json").read_text())
    config.update(rope.fields)
    (folder / "config.json").write_text(json.dumps(config))
    fresh = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    torch.testing.assert_close(swapped, fresh(ids).logits, rtol=0, atol=1e-5)
    if rope.label != "original":
        assert (swapped - before).abs().max() > 1e-3  # the rope really changed
    else:  # unit factors and attention factor 1 are the pre-trained RoPE
        torch.testing.assert_close(swapped, before, rtol=0, atol=1e-5)
    switch.apply(resolve_rope("checkpoint", switch.geometry, TARGET))
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert model.config.rope_parameters["rope_type"] == "default"


def test_rope_specs(tmp_path):
    switch = RopeSwitch(tiny_model())
    yarn = resolve_rope("yarn", switch.geometry, TARGET)
    params = yarn.fields["rope_parameters"]
    assert params == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": TARGET / WINDOW,
                      "original_max_position_embeddings": WINDOW}
    assert yarn.rope_type == "yarn (factor 4)"
    assert resolve_rope("pi", switch.geometry, TARGET).rope_type == "linear (factor 4)"
    assert resolve_rope("original", switch.geometry, None).rope_type == "default (rope_theta 10000)"
    assert yarn.fingerprint != resolve_rope("pi", switch.geometry, TARGET).fingerprint
    assert resolve_rope("mine=yarn", switch.geometry, TARGET).label == "mine"
    from longrope2.rope import RopeScaling

    longrope = RopeScaling.from_method("yarn", switch.geometry, TARGET).to_hf_config()
    rope_config = tmp_path / "rope_config.json"
    rope_config.write_text(json.dumps(longrope))
    assert resolve_rope(str(rope_config), switch.geometry, None).fields == longrope
    with pytest.raises(ValueError, match="needs target_length"):
        resolve_rope("pi", switch.geometry, None)
    with pytest.raises(ValueError, match="existing JSON file"):
        resolve_rope("nope.json", switch.geometry, TARGET)
    other = tmp_path / "best.json"
    other.write_text(json.dumps({"target_length": TARGET, "original_length": 512, "long_factor": [1.0] * 8}))
    with pytest.raises(ValueError, match="original window"):
        resolve_rope(str(other), switch.geometry, TARGET)


@pytest.mark.parametrize("spec", ["pi", "ntk", "yarn"])
def test_baselines_are_themselves_below_the_window(spec):
    """PI, NTK and YaRN change the RoPE at every length, also inside the original window: the
    rebuilt rotary module's inverse frequencies are each method's own (transformers' linear and
    yarn against rope/factors.py, NTK as the base change of rope/factors.ntk_factors), and the
    logits of a prompt shorter than the window differ from the original RoPE's."""
    from longrope2.rope import factors

    model = tiny_model()
    switch = RopeSwitch(model)
    ids = torch.tensor([tokenize.from_hf(tokenizer()).encode(books()[2][1])[:WINDOW // 2]])
    switch.apply(resolve_rope("original", switch.geometry, TARGET))
    original = model(ids).logits
    base_inv = model.model.rotary_emb.inv_freq.double().clone()
    switch.apply(resolve_rope(spec, switch.geometry, TARGET))
    rotary = model.model.rotary_emb
    family = {"pi": factors.pi_factors, "ntk": factors.ntk_factors, "yarn": factors.yarn_factors}[spec]
    expected = base_inv / family(16, 10000.0, WINDOW, TARGET)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-5, atol=0)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(TARGET / WINDOW) + 1 if spec == "yarn" else 1.0)
    assert (model(ids).logits - original).abs().max() > 1e-2


def test_longrope_file_with_unit_short_factors_is_the_original_below_the_window(tmp_path):
    """A ``longrope`` rope_config.json keeps its own switch: short factors 1 (attention factor 1)
    give the original RoPE inside the window and its long factors beyond it."""
    from longrope2.rope import RopeScaling

    model = tiny_model()
    switch = RopeSwitch(model)
    path = tmp_path / "rope_config.json"
    scaling = RopeScaling.from_method("yarn", switch.geometry, TARGET, attention_factor=1.0)
    path.write_text(json.dumps(scaling.to_hf_config()))
    rope = resolve_rope(str(path), switch.geometry, None)
    assert rope.fields["rope_parameters"]["short_factor"] == [1.0] * 8
    assert rope.rope_type == f"longrope (original window {WINDOW})"
    text = tokenize.from_hf(tokenizer()).encode(books()[2][1])
    short, long = torch.tensor([text[:WINDOW // 2]]), torch.tensor([text[:WINDOW * 2]])
    switch.apply(resolve_rope("original", switch.geometry, TARGET))
    original_short, original_long = model(short).logits, model(long).logits
    switch.apply(rope)
    torch.testing.assert_close(model(short).logits, original_short, rtol=0, atol=1e-5)
    assert (model(long).logits - original_long).abs().max() > 1e-2
