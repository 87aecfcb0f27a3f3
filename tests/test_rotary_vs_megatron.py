"""With unit factors the dual-cache rotary is megatron's stock RotaryEmbedding, in every mode."""

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from longrope2.parallel.cpu_backend import enable_cpu_backend
from longrope2.rope import RopeGeometry, RopeScaling
from longrope2.rope.rotary import DualCacheRotaryEmbedding

ORIGINAL = 128


@pytest.mark.parametrize("rotary_percent", [1.0, 0.75])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("unit_scaling", [False, True])
def test_unit_factors_equal_megatron_stock_rotary(rotary_percent, interleaved, unit_scaling):
    enable_cpu_backend()  # megatron's get_emb moves inv_freq to torch.cuda.current_device()
    stock = RotaryEmbedding(kv_channels=64, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                            rotary_base=10000, use_cpu_initialization=True)
    geometry = RopeGeometry(64, 10000.0, ORIGINAL, rotary_percent)
    # an explicit all-ones long set must behave exactly like no scaling at all
    scaling = RopeScaling.from_method("base", geometry, 4 * ORIGINAL) if unit_scaling else None
    ours = DualCacheRotaryEmbedding(64, rotary_percent, 10000.0, ORIGINAL, scaling, rotary_interleaved=interleaved)
    for seq_len, offset in ((16, 0), (ORIGINAL, 0), (ORIGINAL + 1, 0), (4 * ORIGINAL, 0), (8, 300)):
        expected = stock.get_emb(seq_len, offset)
        got = ours.get_emb(seq_len, offset)
        assert got.shape == expected.shape == (seq_len, 1, 1, int(64 * rotary_percent))
        assert torch.equal(got, expected), (seq_len, offset)
        assert torch.equal(ours(seq_len, packed_seq=True), stock(seq_len, packed_seq=True))


@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_bfloat16", "float16_module"])
def test_angles_stay_fp32_after_the_model_is_cast(cast):
    """Cast after building (as megatron's ``Float16Module`` does): the angle at position 131,071
    is still the fp32 one, bit for bit, for both factor sets."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    geometry = RopeGeometry(64, 500000.0, 8192)
    scaling = RopeScaling.from_method("yarn", geometry, 131072)
    rotary = DualCacheRotaryEmbedding(64, 1.0, 500000.0, 8192, scaling)
    expected_long = rotary.get_emb(131072).clone()
    expected_short = rotary.get_emb(8192).clone()
    holder = torch.nn.Sequential(torch.nn.Linear(4, 4), rotary)
    if cast == "bfloat16":
        holder.bfloat16()
    elif cast == "half":
        holder.half()
    elif cast == "to_bfloat16":
        holder.to(torch.bfloat16)
    else:
        config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, bf16=True,
                                   pipeline_dtype=torch.bfloat16)
        Float16Module(config, holder)
    assert holder[0].weight.dtype != torch.float32  # the cast did happen
    assert rotary.short_inv_freq.dtype == rotary.long_inv_freq.dtype == torch.float32
    long = rotary.get_emb(131072)
    assert long.dtype == torch.float32
    assert torch.equal(long[-1], expected_long[-1])
    assert torch.equal(rotary.get_emb(8192)[-1], expected_short[-1])
    # what bf16 angles would have been: most late positions collapse onto each other
    assert torch.unique(long[-4096:, 0, 0, 0]).numel() == 4096
