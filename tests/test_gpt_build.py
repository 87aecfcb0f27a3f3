"""Single process: ParallelDims checks, the CPU backend's RNG tracker, and the tiny GPTModel built
on CPU (world size 1, gloo) running forward and backward."""

import pytest
import torch

from longrope2.model.config import ModelConfig
from longrope2.parallel import ParallelDims, default_device, destroy_parallel, initialize_parallel
from longrope2.rope import RopeScaling, family_factors
from longrope2.rope.rotary import DualCacheRotaryEmbedding, attention_factor_of

SEED = 1234
TINY = ModelConfig.from_name("tiny")  # 4 layers, 4 heads / 2 query groups, vocab 512


# --- ParallelDims ---------------------------------------------------------------------------


def test_dp_is_what_the_world_leaves():
    dims = ParallelDims(tp=2, pp=2, cp=1, world_size=8)
    assert (dims.dp, dims.model_parallel_size) == (2, 4)
    assert ParallelDims(tp=1, pp=1, cp=2, world_size=2).dp == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, pp=2, cp=1, world_size=6), r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"),
    (dict(tp=1, pp=1, cp=3, world_size=4), r"not divisible by tp\*pp\*cp"),
    (dict(tp=0, world_size=1), r"tp must be a positive int"),
    (dict(pp=-1, world_size=1), r"pp must be a positive int"),
    (dict(world_size=0), r"world_size must be a positive int"),
    (dict(tp=1, sequence_parallel=True, world_size=1), r"sequence_parallel needs tp > 1"),
])
def test_bad_layout_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("dims, message", [
    (ParallelDims(tp=8, world_size=8), r"attention heads 4 not divisible by tp=8"),
    (ParallelDims(tp=4, world_size=4), r"query groups 2 not divisible by tp=4"),
    (ParallelDims(pp=3, world_size=3), r"layers 4 not divisible by pp=3"),
])
def test_layout_against_model_raises(dims, message):
    with pytest.raises(ValueError, match=message):
        dims.validate(TINY)


def test_vocab_must_split_over_tp():
    odd_vocab = ModelConfig.from_dict({**vars(TINY), "vocab_size": 513})
    with pytest.raises(ValueError, match=r"vocab size 513 not divisible by tp=2 \(pad"):
        ParallelDims(tp=2, world_size=2).validate(odd_vocab)


def test_layout_that_fits_passes():
    assert ParallelDims(tp=2, pp=2, cp=2, world_size=8).validate(TINY, seq_len=256).dp == 1


@pytest.mark.parametrize("kwargs, divisor", [
    (dict(), 1),
    (dict(tp=2), 1),
    (dict(cp=2), 4),
    (dict(cp=4), 8),
    (dict(tp=2, sequence_parallel=True), 2),
    (dict(tp=2, cp=2, sequence_parallel=True), 8),
])
def test_seq_len_divisor(kwargs, divisor):
    dims = ParallelDims(**kwargs, world_size=8)
    assert dims.seq_len_divisor == divisor
    dims.validate(seq_len=divisor * 3)
    if divisor > 1:
        with pytest.raises(ValueError, match=rf"sequence length {divisor * 3 + 1} not divisible by {divisor}"):
            dims.validate(seq_len=divisor * 3 + 1)


def test_seq_len_error_names_cp_and_sequence_parallel():
    with pytest.raises(ValueError, match=r"not divisible by 8 \(2\*cp=4 x tp=2 \(sequence parallel\)\)"):
        ParallelDims(tp=2, cp=2, sequence_parallel=True, world_size=4).validate(seq_len=36)


def test_world_size_without_launcher_is_refused():
    with pytest.raises(ValueError, match="needs a launcher"):
        initialize_parallel(ParallelDims(world_size=2))


# --- one process on CPU -------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process():
    dims = initialize_parallel(ParallelDims(world_size=1), seed=SEED)
    yield dims
    destroy_parallel()


def test_cpu_backend_is_on(single_process):
    from longrope2.parallel.cpu_backend import cpu_backend_enabled, enable_cpu_backend

    assert default_device() == torch.device("cpu")
    assert cpu_backend_enabled()
    enable_cpu_backend()  # idempotent
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.tensor([1, 2], pin_memory=True).tolist() == [1, 2]


def test_rng_tracker_is_seeded_and_forks_on_cpu(single_process):
    """megatron seeds the model-parallel state with seed + 2718 + tp_rank, and ``fork`` switches
    the CPU generator to it and back."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(SEED + 2718))
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(inside, expected)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tracker.fork():
        assert not torch.equal(torch.rand(4), expected), "the tracker's state advances"


def _scaling(cfg: ModelConfig) -> RopeScaling:
    target = 4 * cfg.original_max_position_embeddings
    factors = family_factors("ntk", cfg.rotary_dim, cfg.rope_theta, cfg.original_max_position_embeddings, target)
    return RopeScaling.from_factors(cfg.rope_geometry, target, factors.tolist())


def test_tiny_model_forward_backward(single_process):
    from longrope2.model.gpt import build_gpt_model

    model = build_gpt_model(TINY)
    assert isinstance(model.rotary_pos_emb, DualCacheRotaryEmbedding)
    assert attention_factor_of(model.config) == 1.0
    assert model.pre_process and model.post_process
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert sum(p.numel() for p in model.parameters()) == TINY.num_parameters()

    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(24).expand(2, -1)
    per_token = model(tokens, positions, attention_mask=None, labels=labels)
    assert per_token.shape == (2, 24)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)  # [b, s, vocab]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, TINY.vocab_size), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.detach().reshape(-1), manual, rtol=1e-5, atol=1e-5)

    per_token.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_rope_scaling_reaches_the_model(single_process):
    """Sequences past the original window use the rescaled frequencies, those within it the
    original ones; the attention factor is one model-wide cos/sin scale (as in transformers),
    so it applies to both."""
    from longrope2.model.gpt import build_gpt_model

    scaling = _scaling(TINY)
    model = build_gpt_model(TINY, rope_scaling=scaling).eval()
    assert attention_factor_of(model.config) == pytest.approx(scaling.resolved_attention_factor)
    assert scaling.resolved_attention_factor > 1.0
    rotary = model.rotary_pos_emb
    orig = TINY.original_max_position_embeddings
    torch.testing.assert_close(rotary(orig)[:, 0, 0, : TINY.rotary_dim // 2],
                               torch.outer(torch.arange(orig, dtype=torch.float32), scaling.short_inv_freq))
    torch.testing.assert_close(rotary(orig + 2)[:, 0, 0, : TINY.rotary_dim // 2],
                               torch.outer(torch.arange(orig + 2, dtype=torch.float32), scaling.long_inv_freq))


def test_bf16_build_casts_every_parameter(single_process):
    """megatron's torch norms ignore params_dtype; build_gpt_model casts them so fused RMSNorm
    gets matching dtypes, and the loss stays near the fp32 model's."""
    from longrope2.model.gpt import build_gpt_model

    scaling = _scaling(TINY)
    fp32 = build_gpt_model(TINY, rope_scaling=scaling)
    bf16 = build_gpt_model(TINY, rope_scaling=scaling, params_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.rotary_pos_emb.long_inv_freq.dtype == torch.float32
    with torch.no_grad():
        for (_, p), (_, q) in zip(fp32.named_parameters(), bf16.named_parameters()):
            q.copy_(p)
    tokens = torch.randint(0, TINY.vocab_size, (2, 32))
    positions = torch.arange(32).expand(2, -1)
    losses = [m(tokens, positions, attention_mask=None, labels=tokens).float().mean() for m in (fp32, bf16)]
    losses[1].backward()
    assert abs(losses[0].item() - losses[1].item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in bf16.parameters())


def test_the_no_transformer_engine_notice_prints_once_per_process(capsys):
    """What build_gpt_model prints on a GPU without TransformerEngine: one line, however many
    models a process builds (the search builds one per worker, eval one per rope)."""
    from longrope2.model import gpt

    gpt._say_once_which_attention_runs.cache_clear()
    for _ in range(3):
        gpt._say_once_which_attention_runs()
    assert capsys.readouterr().out.count("attention runs torch SDPA") == 1
