"""The rope math against the paper's numbers and transformers' reference functions."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longrope2.rope import (
    FACTOR_FAMILIES,
    RopeGeometry,
    RopeScaling,
    base_inv_freq,
    family_factors,
    inv_freq_from_factors,
    longrope2_factors,
    periods,
    ten_period_dim,
    theoretical_critical_dim,
)


@pytest.mark.parametrize(
    "dim, base, length, tcd, d10",
    [
        (128, 500000.0, 8192, 35, 24),  # LLaMA3-8B, paper Sec. 3
        (96, 10000.0, 2048, 31, 19),  # Phi3-mini, paper Sec. 3
    ],
)
def test_critical_dims_match_paper(dim, base, length, tcd, d10):
    assert theoretical_critical_dim(dim, base, length) == tcd
    assert ten_period_dim(dim, base, length) == d10
    p = periods(dim, base)
    # d_tcd is the first pair whose period exceeds the window; the pair before completes one
    assert p[tcd] > length >= p[tcd - 1]
    assert p[d10] > length / 10 >= p[d10 - 1]


def test_periods_are_two_pi_over_theta():
    inv = base_inv_freq(64, 1e5).double()
    assert torch.allclose(periods(64, 1e5), 2 * math.pi / inv, rtol=1e-6)


def _hf_config(rope_parameters, head_dim=64, partial=None, max_pos=16384):
    kwargs = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                  max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    if partial is not None:
        kwargs["partial_rotary_factor"] = partial
    return LlamaConfig(**kwargs)


def test_unit_factors_reproduce_hf_default_rope():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(_hf_config({"rope_type": "default", "rope_theta": 1e5}))
    ours = inv_freq_from_factors(64, 1e5, family_factors("base", 64, 1e5, 8192, 8192))
    assert torch.equal(ours, hf.inv_freq)
    assert torch.equal(ours, base_inv_freq(64, 1e5))


@pytest.mark.parametrize("original, target", [(8192, 16384), (8192, 131072), (4096, 131072)])
def test_yarn_matches_transformers(original, target):
    cfg = _hf_config({"rope_type": "yarn", "rope_theta": 1e5, "factor": target / original,
                      "original_max_position_embeddings": original}, max_pos=target)
    hf_inv, hf_attention = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    scaling = RopeScaling.from_method("yarn", RopeGeometry(64, 1e5, original), target)
    torch.testing.assert_close(scaling.long_inv_freq, hf_inv, rtol=1e-6, atol=0)
    assert scaling.resolved_attention_factor == pytest.approx(hf_attention, rel=1e-12)


def test_pi_and_ntk_shapes():
    pi = family_factors("pi", 128, 5e5, 8192, 131072)
    assert torch.all(pi == 16.0)
    ntk = family_factors("ntk", 128, 5e5, 8192, 131072)
    assert ntk[0] == 1.0 and ntk[-1] == pytest.approx(16.0)
    assert torch.all(ntk[1:] > ntk[:-1])
    # NTK is exactly a base change base' = base * s^(d/(d-2))
    new_base = 5e5 * 16.0 ** (128 / 126)
    torch.testing.assert_close(inv_freq_from_factors(128, 5e5, ntk), base_inv_freq(128, new_base), rtol=1e-5, atol=0)


def test_longrope2_factors_have_the_paper_shape():
    # LLaMA3-8B 8k->128k with the paper's found critical dim 30: searched pairs 30..63 in [16, 32]
    upper = torch.linspace(18.0, 30.0, 64 - 30)
    lam = longrope2_factors(128, 5e5, 8192, 131072, critical_dim=30, upper_factors=upper.tolist())
    assert lam.shape == (64,)
    assert torch.equal(lam[30:], upper.double())
    i = torch.arange(30, dtype=torch.float64)
    torch.testing.assert_close(lam[:30], upper[0].double() ** (i / 30))
    assert lam[0] == 1.0
    assert torch.all(lam[1:] >= lam[:-1])


def test_longrope2_rejects_bad_searched_factors():
    kw = dict(dim=128, base=5e5, original_length=8192, target_length=131072, critical_dim=30)
    with pytest.raises(ValueError, match="34 upper factors"):
        longrope2_factors(**kw, upper_factors=[20.0] * 33)
    with pytest.raises(ValueError, match=r"\[s, 2s\]"):
        longrope2_factors(**kw, upper_factors=[15.0] + [20.0] * 33)
    with pytest.raises(ValueError, match=r"\[s, 2s\]"):
        longrope2_factors(**kw, upper_factors=[20.0] * 33 + [33.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        longrope2_factors(**kw, upper_factors=[20.0] * 10 + [19.0] * 24)
    with pytest.raises(ValueError, match="critical_dim"):
        longrope2_factors(128, 5e5, 8192, 131072, critical_dim=64, upper_factors=[])


def test_unknown_family_lists_known():
    with pytest.raises(ValueError, match="known: " + ", ".join(FACTOR_FAMILIES)):
        family_factors("linear", 64, 1e4, 2048, 4096)


def test_target_shorter_than_window_is_an_error():
    with pytest.raises(ValueError, match="shorter than the original window"):
        family_factors("pi", 64, 1e4, 4096, 2048)


# microsoft/Phi-4-mini-instruct config.json (rotary dim 96 = 128 x 0.75, base 1e4, 4k -> 128k)
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]


def test_phi4_mini_published_factors_are_longrope2_with_critical_dim_31():
    """Phi-4-mini's published long_factor is exactly our LongRoPE2 family: searched factors in
    [s, 2s] = [32, 64] from pair 31 on (on the 0.01 grid), the NTK fill 32.03^(i/31) below."""
    published = torch.tensor(PHI4_MINI_LONG_FACTOR, dtype=torch.float64)
    ours = longrope2_factors(96, 10000.0, 4096, 131072, critical_dim=31, upper_factors=PHI4_MINI_LONG_FACTOR[31:])
    torch.testing.assert_close(ours, published, rtol=1e-8, atol=0)
    # the found critical dim sits below the theoretical one, as the paper reports
    assert theoretical_critical_dim(96, 10000.0, 4096) == 34 and ten_period_dim(96, 10000.0, 4096) == 22
