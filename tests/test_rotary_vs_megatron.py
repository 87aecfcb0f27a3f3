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
