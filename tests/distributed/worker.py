"""Parallel-equivalence checks, run once under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Every check lives in the same two processes (megatron's import and gloo set-up are paid once):
megatron's process groups are rebuilt for each layout, the torch.distributed group is kept.

A reference model is built first with TP=PP=CP=1 (the same weights on both ranks, broadcast
from rank 0), and its loss and gradients on a fixed global batch are computed in plain torch,
in each process on its own. Each layout then builds its model with ``build_gpt_model``, copies
its shard of the reference weights in (TP splits along megatron's partition dims, PP keeps its
stage's layers), runs megatron's own schedule / DDP / optimizer, and reports how far its loss,
gradients and updated weights are from the reference. Results go to ``<out>/rank<r>.json``
after every check; the pytest side (tests/test_parallel_equivalence.py) judges them.

The tiny preset is used with its original window cut to 16 tokens and a LongRoPE2 scaling to
64, so the 32-token batches run the long factors and a cos/sin attention factor != 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checks import run_checks  # noqa: E402  (tests/distributed, the script's folder)
from factories import ramp_longrope2_scaling  # noqa: E402

from longrope2.model.config import ModelConfig
from longrope2.model.hf_convert import load_shard, shard_like, tp_shard
from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel
from longrope2.rope import RopeScaling
from longrope2.rope.rotary import DualCacheRotaryEmbedding, attention_factor_of

SEED = 1234
ORIGINAL, TARGET = 16, 64
SEQ, MICRO_BATCH, NUM_MICRO = 32, 2, 4

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


# --- model, data, reference ----------------------------------------------------------------


def model_config(tied: bool = False) -> ModelConfig:
    # a larger init than the preset's 0.02 so the loss is far from ln(vocab) and every weight
    # matters (a mis-split shard moves the loss well past the tolerance)
    return dataclasses.replace(ModelConfig.from_name("tiny"), original_max_position_embeddings=ORIGINAL,
                               init_method_std=0.2, tie_word_embeddings=tied)


def rope_scaling(cfg: ModelConfig) -> RopeScaling:
    return ramp_longrope2_scaling(cfg, ORIGINAL, TARGET)


def make_batches(step: int, count: int = NUM_MICRO) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batch ``step``: ``count`` micro-batches of (tokens, labels), identical on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, model_config().vocab_size, (count, MICRO_BATCH, SEQ + 1), generator=gen)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def positions() -> torch.Tensor:
    return torch.arange(SEQ).expand(MICRO_BATCH, -1)


def build(sequence_parallel=False, tied=False):
    from longrope2.model.gpt import build_gpt_model

    cfg = model_config(tied)
    return build_gpt_model(cfg, rope_scaling=rope_scaling(cfg), sequence_parallel=sequence_parallel, seq_length=SEQ)


def reference_loss_and_grads(model, batches):
    """Plain torch, one process: mean over micro-batches of the mean token loss."""
    model.zero_grad(set_to_none=True)
    loss = sum(model(t, positions(), attention_mask=None, labels=l).float().mean() for t, l in batches) / len(batches)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), grads


# --- sharding the reference into a parallel model -----------------------------------------


def compare(model, full_ref: dict, local: dict) -> dict:
    """Max abs and relative (to the reference's max) difference of local tensors vs reference shards."""
    expected = shard_like(model, full_ref)
    errors = {k: (local[k] - expected[k]).abs().max().item() for k in expected}
    worst = max(errors, key=errors.get)
    scale = max(expected[k].abs().max().item() for k in expected)
    return {"max_abs": errors[worst], "max_rel": errors[worst] / scale, "worst": worst,
            "worst_rel_to_own_max": errors[worst] / max(expected[worst].abs().max().item(), 1e-30),
            "count": len(expected)}


def wrap_ddp(model, use_distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer,
                                                 overlap_grad_reduce=False),
        module=model,
    )
    # the schedule calls this after the last backward: DP reduction, SP norm grads over TP
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def run_schedule(model, batches, forward_only=False) -> float:
    """megatron's forward-backward function for the current layout; the mean loss of the
    micro-batches on the last stage (nan elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        output = model(tokens, positions(), attention_mask=None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            # a copy: the schedule divides the returned loss by the micro-batch count in place
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    if not losses:
        return float("nan")
    return torch.stack([x["loss"] for x in losses]).mean().item()


def grads_of(model) -> dict:
    return {n: (p.main_grad if hasattr(p, "main_grad") else p.grad).detach().clone() for n, p in model.named_parameters()}


# --- checks ---------------------------------------------------------------------------------


def build_reference(tied: bool = False):
    """TP=PP=CP=1 model (world of 2 as DP=2, no communication in the model), the same on both
    ranks; returns the model, its weights, whether both ranks built the same ones, loss, grads."""
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1), seed=SEED)
    model = build(tied=tied)
    with torch.no_grad():  # random norm weights, so a norm grad that is not reduced over TP shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in state.items()}
    for t in state.values():
        dist.broadcast(t, src=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    loss, grads = reference_loss_and_grads(model, make_batches(0))
    destroy_parallel()
    same = all(torch.equal(before[n], state[n]) for n in state)
    return model, state, same, loss, grads


@check
def reference(ctx):
    model, state, same, loss, grads = build_reference()
    ctx.cfg = model_config()
    ctx.ref_model, ctx.ref_state, ctx.ref_loss, ctx.ref_grads = model, state, loss, grads
    return {
        "rotary_is_dual_cache": isinstance(model.rotary_pos_emb, DualCacheRotaryEmbedding),
        "uses_long_factors": model.rotary_pos_emb.uses_long_factors(SEQ),
        "attention_factor": attention_factor_of(model.config),
        "expected_attention_factor": rope_scaling(ctx.cfg).resolved_attention_factor,
        "same_init_on_both_ranks": same,
        "loss": ctx.ref_loss,
    }


def _tp_check(ctx, sequence_parallel: bool):
    initialize_parallel(ParallelDims(tp=2, pp=1, cp=1, sequence_parallel=sequence_parallel), seed=SEED)
    model = build(sequence_parallel=sequence_parallel)
    load_shard(model, ctx.ref_state)
    runner = wrap_ddp(model) if sequence_parallel else model  # SP needs finalize_model_grads (DDP)
    loss = run_schedule(runner, make_batches(0))
    result = {
        "rotary_is_dual_cache": isinstance(model.rotary_pos_emb, DualCacheRotaryEmbedding),
        "sequence_parallel": model.config.sequence_parallel,
        "loss": loss,
        "loss_abs_err": abs(loss - ctx.ref_loss),
        "grads": compare(model, ctx.ref_grads, grads_of(model)),
        "weights": compare(model, ctx.ref_state, {n: p.detach() for n, p in model.named_parameters()}),
    }
    destroy_parallel()
    return result


@check
def tp2(ctx):
    return _tp_check(ctx, sequence_parallel=False)


@check
def tp2_sequence_parallel(ctx):
    return _tp_check(ctx, sequence_parallel=True)


@check
def tp2_naive_fc1_split(ctx):
    """Negative control: split [gate; up] as one block (rank 0 all gate, rank 1 all up) and
    the loss must move; shows the loss comparison can fail."""
    def naive(key, full, rank, size):
        if key.endswith("linear_fc1.weight"):
            return full.chunk(size, dim=0)[rank]
        return tp_shard(key, full, rank, size)

    initialize_parallel(ParallelDims(tp=2, pp=1, cp=1), seed=SEED)
    model = build()
    load_shard(model, ctx.ref_state, fc1_rule=naive)
    loss = run_schedule(model, make_batches(0), forward_only=True)
    destroy_parallel()
    return {"loss": loss, "loss_abs_err": abs(loss - ctx.ref_loss)}


@check
def pp2(ctx):
    """1F1B over 2 stages (layers 0-1 and 2-3), 4 micro-batches, megatron DDP for the grads."""
    initialize_parallel(ParallelDims(tp=1, pp=2, cp=1), seed=SEED)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

    model = build()
    load_shard(model, ctx.ref_state)
    ddp = wrap_ddp(model)
    loss = run_schedule(ddp, make_batches(0))
    result = {
        "schedule_is_1f1b": get_forward_backward_func() is forward_backward_pipelining_without_interleaving,
        "stage": ps.get_pipeline_model_parallel_rank(),
        "layers": [layer.layer_number for layer in model.decoder.layers],
        "has_embedding": model.pre_process,
        "has_output_layer": model.post_process,
        "rotary_is_dual_cache": isinstance(model.rotary_pos_emb, DualCacheRotaryEmbedding),
        "loss": loss if model.post_process else None,
        "loss_abs_err": abs(loss - ctx.ref_loss) if model.post_process else None,
        "grads": compare(model, ctx.ref_grads, grads_of(model)),
    }
    destroy_parallel()
    return result


def owned_grad_shard(ddp, model, ref_grads: dict, dp_rank: int, dp_size: int) -> dict:
    """After the distributed optimizer's reduce-scatter each DP rank holds the reduced grads of
    its 1/dp slice of every bucket only; compare that slice with the reference grads."""
    expected = shard_like(model, ref_grads)
    name_of = {p: n for n, p in model.named_parameters()}
    abs_err, scale, owned = 0.0, 0.0, 0
    for buffer in ddp.buffers:
        want = torch.zeros_like(buffer.grad_data)
        for param, (start, end, _) in buffer.param_index_map.items():
            want[start:end] = expected[name_of[param]].reshape(-1)
        for bucket in buffer.buckets:
            n = bucket.grad_data.numel() // dp_size
            got = bucket.grad_data[dp_rank * n:(dp_rank + 1) * n]
            exp = want[bucket.offset + dp_rank * n:bucket.offset + (dp_rank + 1) * n]
            abs_err = max(abs_err, (got - exp).abs().max().item())
            scale = max(scale, exp.abs().max().item())
            owned += n
    return {"max_abs": abs_err, "max_rel": abs_err / scale, "owned_elements": owned,
            "total_elements": sum(b.grad_data.numel() for b in ddp.buffers)}


def _dp_local_batches(step: int, rank: int, size: int):
    per_rank = NUM_MICRO // size
    return make_batches(step)[rank * per_rank:(rank + 1) * per_rank]


@check
def pp2_tied_embeddings(ctx):
    """PP=2 with tied input/output embeddings (SmolLM2's layout): the last stage holds a copy of
    the embedding as its output layer; finalize_model_grads sums the two stages' grads."""
    _, state, _, ref_loss, ref_grads = build_reference(tied=True)
    initialize_parallel(ParallelDims(tp=1, pp=2, cp=1), seed=SEED)
    model = build(tied=True)
    load_shard(model, state)
    ddp = wrap_ddp(model)
    loss = run_schedule(ddp, make_batches(0))
    result = {
        "has_embedding": model.pre_process,
        "has_output_weight": "output_layer.weight" in dict(model.named_parameters()),
        "loss": loss if model.post_process else None,
        "loss_abs_err": abs(loss - ref_loss) if model.post_process else None,
        "grads": compare(model, ref_grads, grads_of(model)),
    }
    destroy_parallel()
    return result


@check
def dp2_ddp(ctx):
    """DP=2 with megatron DDP (all-reduce): each rank half the micro-batches, full averaged grads."""
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1), seed=SEED)
    from megatron.core import parallel_state as ps

    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    model = build()
    load_shard(model, ctx.ref_state)
    ddp = wrap_ddp(model)
    local_loss = run_schedule(ddp, _dp_local_batches(0, rank, size))
    mean_loss = torch.tensor(local_loss)
    dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
    result = {
        "dp": size,
        "local_loss": local_loss,
        "loss_abs_err": abs(mean_loss.item() / size - ctx.ref_loss),
        "local_loss_differs_from_global": abs(local_loss - ctx.ref_loss),
        "grads": compare(model, ctx.ref_grads, grads_of(model)),
    }
    destroy_parallel()
    return result


@check
def dp2_distributed_optimizer(ctx):
    """DP=2: each rank half the micro-batches, megatron DDP + DistributedOptimizer (Adam, clip
    1.0), one step, then the next batch's loss; against torch AdamW on the reference."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    lr, clip = 1e-3, 1.0
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1), seed=SEED)
    from megatron.core import parallel_state as ps

    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    model = build()
    load_shard(model, ctx.ref_state)
    ddp = wrap_ddp(model, use_distributed_optimizer=True)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                              adam_eps=1e-8, clip_grad=clip, use_distributed_optimizer=True, params_dtype=torch.float32)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    local = _dp_local_batches(0, rank, size)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    local_loss = run_schedule(ddp, local)
    mean_loss = torch.tensor(local_loss)
    dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
    grads = owned_grad_shard(ddp, model, ctx.ref_grads, rank, size)
    ok, grad_norm, _ = optimizer.step()

    # reference: the same step in plain torch on a full copy of the reference model
    ref = build()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(ctx.ref_state[n])
            p.grad = ctx.ref_grads[n].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip).item()
    torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    ref_after = {n: p.detach().clone() for n, p in ref.named_parameters()}
    moved = max((ref_after[n] - ctx.ref_state[n]).abs().max().item() for n in ref_after)

    next_batches = make_batches(1)
    with torch.no_grad():
        ref_next = (sum(ref(t, positions(), attention_mask=None, labels=l).mean() for t, l in next_batches)
                    / len(next_batches)).item()
    next_local = torch.tensor(run_schedule(ddp, _dp_local_batches(1, rank, size), forward_only=True))
    dist.all_reduce(next_local, group=ps.get_data_parallel_group())
    result = {
        "dp": size,
        "step_ok": bool(ok),
        "loss_abs_err": abs(mean_loss.item() / size - ctx.ref_loss),
        "grads": grads,
        "grad_norm_abs_err": abs(float(grad_norm) - ref_norm),
        "ref_grad_norm": ref_norm,
        "ref_max_update": moved,
        "weights_after_step": compare(model, ref_after, {n: p.detach() for n, p in model.named_parameters()}),
        "next_loss_abs_err": abs(next_local.item() / size - ref_next),
        "next_loss_moved": abs(ref_next - reference_loss_and_grads(ctx.ref_model, next_batches)[0]),
    }
    destroy_parallel()
    return result


@check
def cp2_rotary(ctx):
    """CP=2: each rank's rotary angles are chunks [r, 2cp-1-r] of the CP=1 angles, for a short
    (original factors) and a long (rescaled) length; megatron's get_rotary_seq_len gives the
    full length from a rank's local chunk."""
    from megatron.core import parallel_state as ps

    cfg = ctx.cfg
    scaling = rope_scaling(cfg)
    full_rotary = ctx.ref_model.rotary_pos_emb
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=2), seed=SEED)
    cp_group = ps.get_context_parallel_group()
    rank, size = cp_group.rank(), cp_group.size()
    # built directly: megatron's local core attention (the CPU spec) refuses CP > 1 at construction
    rotary = DualCacheRotaryEmbedding(cfg.head_dim, cfg.rotary_percent, cfg.rope_theta,
                                      cfg.original_max_position_embeddings, scaling, cp_group=cp_group)

    result = {"rotary_is_dual_cache": isinstance(rotary, DualCacheRotaryEmbedding), "cp_rank": rank, "lengths": {}}
    for seq in (ORIGINAL, TARGET):
        full = full_rotary(seq)
        local = rotary(seq)
        chunk = seq // (2 * size)
        rows = list(range(rank * chunk, (rank + 1) * chunk)) + list(
            range((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk))
        inv_freq = rotary.long_inv_freq if rotary.uses_long_factors(seq) else rotary.short_inv_freq
        found_positions = (local[:, 0, 0, 0] / inv_freq[0]).round().long().tolist()
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local.contiguous(), group=cp_group)
        # reassemble: rank r's halves are chunks r and 2cp-1-r
        pieces = [None] * (2 * size)
        for r, g in enumerate(gathered):
            pieces[r], pieces[2 * size - 1 - r] = g.chunk(2, dim=0)
        cfg_view = SimpleNamespace(sequence_parallel=False, tensor_model_parallel_size=1, context_parallel_size=size)
        result["lengths"][str(seq)] = {
            "long_factors": rotary.uses_long_factors(seq),
            "local_rows": local.shape[0],
            "positions_match": found_positions == rows,
            "angles_abs_err": (local - full[rows]).abs().max().item(),
            "reassembled_abs_err": (torch.cat(pieces) - full).abs().max().item(),
            "rotary_seq_len": rotary.get_rotary_seq_len(None, None, torch.empty(seq // size, 1, 1), cfg_view),
        }
    destroy_parallel()
    return result


@check
def cp2_model(ctx):
    """CP=2 through the whole model (our SDPA core attention: K/V all-gathered over CP, causal
    mask from global positions): loss and grads match the reference."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=2), seed=SEED)
    cp_group = ps.get_context_parallel_group()
    model = build()
    load_shard(model, ctx.ref_state)
    model.zero_grad(set_to_none=True)
    batches = make_batches(0)
    local = 0.0
    for tokens, labels in batches:
        part = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions()})
        # equal token counts per rank: the global mean is the mean of the ranks' means
        loss = model(part["tokens"], part["position_ids"], attention_mask=None, labels=part["labels"]).float().mean()
        (loss / (len(batches) * cp_group.size())).backward()
        local += loss.item() / (len(batches) * cp_group.size())
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total, group=cp_group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=cp_group)
    result = {
        "local_tokens": part["tokens"].shape[1],
        "loss": total.item(),
        "loss_abs_err": abs(total.item() - ctx.ref_loss),
        "grads": compare(model, ctx.ref_grads, grads_of(model)),
    }
    destroy_parallel()
    return result


# --- driver -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="run these checks (and the reference) only")
    args = parser.parse_args()
    ctx = SimpleNamespace()
    chosen = [fn for fn in CHECKS if not args.only or fn.__name__ == "reference" or fn.__name__ in args.only]
    return run_checks([(fn.__name__, partial(fn, ctx)) for fn in chosen], args.out)


if __name__ == "__main__":
    sys.exit(main())
