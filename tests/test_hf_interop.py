"""RopeScaling and the dual-cache rotary against transformers' ``longrope`` implementation."""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_apply_rotary

from longrope2.rope import RopeGeometry, RopeScaling, longrope2_factors
from longrope2.rope.rotary import DualCacheRotaryEmbedding, attention_factor_of, set_attention_factor

ORIGINAL, TARGET = 256, 1024


def _scaling(head_dim=16, rotary_percent=1.0, short_factor=None, attention_factor=None):
    geometry = RopeGeometry(head_dim, 10000.0, ORIGINAL, rotary_percent)
    half = geometry.rotary_dim // 2
    crit = half // 2
    s = TARGET / ORIGINAL
    upper = torch.linspace(s * 1.1, s * 1.9, half - crit).tolist()
    long_factor = longrope2_factors(geometry.rotary_dim, 10000.0, ORIGINAL, TARGET, crit, upper).tolist()
    return RopeScaling.from_factors(geometry, TARGET, long_factor, short_factor, attention_factor)


def _hf_config(scaling, style, head_dim=16, rotary_percent=1.0, cls=LlamaConfig):
    fields = dict(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                  num_hidden_layers=1, intermediate_size=32, vocab_size=64)
    if rotary_percent != 1.0:
        fields["partial_rotary_factor"] = rotary_percent
    fields.update(scaling.to_hf_config(style))
    return cls(**fields)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("cls, rotary_percent", [(LlamaConfig, 1.0), (Phi3Config, 0.75)])
def test_round_trip_and_same_frequencies_as_transformers(style, cls, rotary_percent):
    short = [1.0 + 0.01 * i for i in range(int(16 * rotary_percent) // 2)]  # Phi-3 style non-unit short set
    scaling = _scaling(rotary_percent=rotary_percent, short_factor=short)
    config = _hf_config(scaling, style, rotary_percent=rotary_percent, cls=cls)
    # through a saved config.json too
    again = RopeScaling.from_hf_config(cls.from_dict(config.to_dict()))
    assert again.long_factor == scaling.long_factor and again.short_factor == scaling.short_factor
    assert again.rotary_dim == scaling.rotary_dim
    assert again.resolved_attention_factor == pytest.approx(scaling.resolved_attention_factor)

    init = ROPE_INIT_FUNCTIONS["longrope"]
    short_inv, hf_attention = init(config, "cpu", seq_len=ORIGINAL)
    long_inv, _ = init(config, "cpu", seq_len=ORIGINAL + 1)
    assert torch.equal(scaling.inv_freq(ORIGINAL), short_inv)
    assert torch.equal(scaling.inv_freq(ORIGINAL + 1), long_inv)
    # HF default attention factor sqrt(1 + ln s / ln L)
    assert hf_attention == pytest.approx(math.sqrt(1 + math.log(TARGET / ORIGINAL) / math.log(ORIGINAL)))
    assert scaling.resolved_attention_factor == pytest.approx(hf_attention, rel=1e-12)


def test_explicit_attention_factor_is_kept():
    scaling = _scaling(attention_factor=1.25)
    config = _hf_config(scaling, "rope_parameters")
    _, hf_attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    assert hf_attention == 1.25 == RopeScaling.from_hf_config(config).resolved_attention_factor


def test_clear_errors_on_bad_configs():
    scaling = _scaling()
    good = _hf_config(scaling, "rope_parameters").to_dict()
    bad = {**good, "rope_parameters": {**good["rope_parameters"], "long_factor": [4.0] * 7}}
    with pytest.raises(ValueError, match="long_factor must have rotary_dim/2 = 8 entries, got 7"):
        RopeScaling.from_hf_config(bad)
    bad = {**good, "rope_parameters": {**good["rope_parameters"], "short_factor": [1.0] * 7 + [0.0]}}
    with pytest.raises(ValueError, match="short_factor must be finite and positive"):
        RopeScaling.from_hf_config(bad)
    rope = dict(good["rope_parameters"])
    del rope["original_max_position_embeddings"]
    no_original = {k: v for k, v in good.items() if k != "original_max_position_embeddings"}
    with pytest.raises(ValueError, match="missing original_max_position_embeddings"):
        RopeScaling.from_hf_config({**no_original, "rope_parameters": rope})
    with pytest.raises(ValueError, match="missing 'long_factor'"):
        RopeScaling.from_hf_config({**good, "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8}})
    with pytest.raises(ValueError, match="expected rope_type 'longrope'"):
        RopeScaling.from_hf_config({**good, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_factor must be positive"):
        _scaling(attention_factor=-1.0)


def _hf_rotated(scaling, head_dim, rotary_percent, q, k, seq_len):
    config = _hf_config(scaling, "rope_parameters", head_dim=head_dim, rotary_percent=rotary_percent, cls=Phi3Config)
    rotary = Phi3RotaryEmbedding(config) if rotary_percent != 1.0 else LlamaRotaryEmbedding(config)
    position_ids = torch.arange(seq_len)[None]
    cos, sin = rotary(q, position_ids)
    return hf_apply_rotary(q, k, cos, sin)  # the Phi-3 one handles partial rotary; equal to LLaMA's at 100%


@pytest.mark.parametrize("rotary_percent", [1.0, 0.75])
@pytest.mark.parametrize("seq_len", [ORIGINAL // 2, ORIGINAL, ORIGINAL + 1, TARGET])
def test_rotated_q_k_match_transformers(rotary_percent, seq_len):
    """Our angles + megatron's rotation + our attention factor == HF longrope, both regimes."""
    head_dim = 16
    scaling = _scaling(head_dim, rotary_percent, short_factor=[1.0 + 0.05 * i for i in range(int(head_dim * rotary_percent) // 2)])
    torch.manual_seed(0)
    q = torch.randn(1, 4, seq_len, head_dim)  # HF layout [b, h, s, d]
    k = torch.randn(1, 4, seq_len, head_dim)
    hf_q, hf_k = _hf_rotated(scaling, head_dim, rotary_percent, q, k, seq_len)

    rotary = DualCacheRotaryEmbedding(head_dim, rotary_percent, 10000.0, ORIGINAL, scaling)
    assert rotary.uses_long_factors(seq_len) == (seq_len > ORIGINAL)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=head_dim)
    set_attention_factor(config, scaling.resolved_attention_factor)
    freqs = rotary(seq_len)  # [s, 1, 1, rotary_dim]
    ours = [
        _apply_rotary_pos_emb_bshd(t.permute(2, 0, 1, 3), freqs, mscale=attention_factor_of(config)).permute(1, 2, 0, 3)
        for t in (q, k)
    ]
    torch.testing.assert_close(ours[0], hf_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], hf_k, rtol=1e-6, atol=1e-6)


def test_attention_factor_reaches_megatron_exactly():
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    assert attention_factor_of(config) == 1.0
    for factor in (1.0377, 1.1435, 1.25, 0.9):
        set_attention_factor(config, factor)
        assert attention_factor_of(config) == pytest.approx(factor, rel=1e-14)
    set_attention_factor(config, 1.0)
    assert attention_factor_of(config) == 1.0


def test_swapping_factors_invalidates_cached_angles():
    scaling = _scaling()
    rotary = DualCacheRotaryEmbedding(16, 1.0, 10000.0, ORIGINAL, scaling)
    before = rotary(TARGET).clone()
    assert rotary(TARGET) is rotary(TARGET)  # cached
    doubled = RopeScaling.from_factors(RopeGeometry(16, 10000.0, ORIGINAL), TARGET, [2 * x for x in scaling.long_factor])
    rotary.set_scaling(doubled)
    after = rotary(TARGET)
    torch.testing.assert_close(after * 2, before)  # angles halve when every factor doubles
    short_before = rotary(ORIGINAL)
    rotary.set_scaling(None)
    torch.testing.assert_close(rotary(TARGET), before * torch.tensor(scaling.long_factor).repeat(2))
    assert torch.equal(rotary(ORIGINAL), short_before)


def test_rotary_rejects_mismatched_scaling():
    rotary = DualCacheRotaryEmbedding(16, 1.0, 10000.0, ORIGINAL)
    with pytest.raises(ValueError, match="rotary dim 12, the model rotates 16"):
        rotary.set_scaling(_scaling(rotary_percent=0.75))
    other = RopeScaling.from_method("pi", RopeGeometry(16, 10000.0, 512), 1024)
    with pytest.raises(ValueError, match="original window of 512"):
        rotary.set_scaling(other)


def test_factors_from_every_file_format(tmp_path):
    """A search best.json, an exported rope_config.json (both HF styles), a whole HF config.json
    and a bare list all give the same RopeScaling; overrides win; mismatches raise."""
    import json

    scaling = _scaling()
    geometry = RopeGeometry(16, 10000.0, ORIGINAL)
    files = {
        "best.json": {"target_length": TARGET, "original_length": ORIGINAL, "critical_dim": 4,
                      "long_factor": list(scaling.long_factor), "attention_factor": scaling.resolved_attention_factor},
        "rope_config.json": scaling.to_hf_config("rope_parameters"),
        "legacy.json": scaling.to_hf_config("rope_scaling"),
        "config.json": _hf_config(scaling, "rope_parameters").to_dict(),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
        again = RopeScaling.from_file(tmp_path / name, geometry)
        assert again.long_factor == scaling.long_factor and again.max_position_embeddings == TARGET, name
        assert again.resolved_attention_factor == pytest.approx(scaling.resolved_attention_factor), name
    (tmp_path / "list.json").write_text(json.dumps(list(scaling.long_factor)))
    bare = RopeScaling.from_file(tmp_path / "list.json", geometry, fallback_target_length=TARGET)
    assert bare.long_factor == scaling.long_factor and bare.attention_factor is None
    overridden = RopeScaling.from_file(tmp_path / "best.json", geometry, 2 * TARGET, attention_factor=1.5)
    assert overridden.max_position_embeddings == 2 * TARGET and overridden.resolved_attention_factor == 1.5

    with pytest.raises(ValueError, match="does not say the target length"):
        RopeScaling.from_file(tmp_path / "list.json", geometry)
    with pytest.raises(ValueError, match="has 8 long factors, the model needs rotary_dim/2 = 4"):
        RopeScaling.from_file(tmp_path / "best.json", RopeGeometry(8, 10000.0, ORIGINAL))
    with pytest.raises(ValueError, match="original window of 256, the model's is 512"):
        RopeScaling.from_file(tmp_path / "rope_config.json", RopeGeometry(16, 10000.0, 512))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        RopeScaling.from_file(tmp_path / "bad.json", geometry)
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="has no long_factor"):
        RopeScaling.from_file(tmp_path / "other.json", geometry)
    with pytest.raises(FileNotFoundError, match="not found"):
        RopeScaling.from_file(tmp_path / "missing.json", geometry)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_exported_config_loads_without_transformers_warnings(style):
    """``to_hf_config`` writes ``factor`` (target / original): transformers builds the config and
    its longrope frequencies without a warning; the same config without ``factor`` does warn
    (so the capture is live)."""
    import logging

    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    scaling = _scaling()
    assert scaling.to_hf_config(style)[style]["factor"] == TARGET / ORIGINAL

    def warnings_of(drop_factor: bool) -> str:
        logging.Logger.warning_once.cache_clear()  # transformers says each warning once per process
        fields = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                      num_hidden_layers=1, intermediate_size=32, vocab_size=64, **scaling.to_hf_config(style))
        if drop_factor:
            del fields[style]["factor"]
        with CaptureLogger(hf_logging.get_logger("transformers")) as captured:
            config = LlamaConfig(**fields)
            ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=TARGET)
        return captured.out

    assert warnings_of(drop_factor=False) == ""
    assert "factor" in warnings_of(drop_factor=True)
