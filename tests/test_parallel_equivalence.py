"""TP, TP+SP, PP (1F1B), DP (DDP, DistributedOptimizer) and the CP rotary on 2 CPU ranks (gloo)
match a single-process reference built from the same weights.

One ``torchrun --nproc_per_node 2`` runs every check in ``tests/distributed/worker.py`` (megatron's
import is paid once); each rank writes its measurements to JSON and the tests below judge them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun import checked, run_checks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "distributed" / "worker.py"
NPROC = 2
TIMEOUT_S = 240

LOSS_ATOL = 1e-5
"""Loss vs the reference (loss ~7.47); measured 0 (TP, PP) to 5e-7 (DP)."""
GRAD_RTOL = 2e-5
"""Max gradient error over the max |reference gradient|; measured <= 5e-6 under TP (the fp32
reference itself is 6e-6 from an fp64 one), <= 2e-7 under PP and DP."""
WEIGHT_ATOL = 1e-5
"""Weights after one Adam step (lr 1e-3, so each moves ~1e-3); measured 3e-7."""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(NPROC, str(WORKER), tmp_path_factory.mktemp("parallel_equivalence"), timeout=TIMEOUT_S)


def _assert_grads(grads: dict, rank: int) -> None:
    assert grads["max_rel"] <= GRAD_RTOL, f"rank {rank}: gradient error {grads} (tolerance {GRAD_RTOL})"


def test_worker_exit_code(results):
    assert results["returncode"] == 0, results["log"][-4000:]


def test_reference_model_uses_dual_cache_rotary_with_long_factors(results):
    for rank, r in enumerate(checked(results, "reference")):
        assert r["rotary_is_dual_cache"], rank
        assert r["uses_long_factors"], "the 32-token batches must exercise the rescaled RoPE"
        assert r["attention_factor"] == pytest.approx(r["expected_attention_factor"], rel=1e-12)
        assert r["attention_factor"] > 1.01
        assert r["same_init_on_both_ranks"], "same seed, same weights"
    losses = [r["loss"] for r in checked(results, "reference")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("name", ["tp2", "tp2_sequence_parallel"])
def test_tensor_parallel_matches_reference(results, name):
    for rank, r in enumerate(checked(results, name)):
        assert r["rotary_is_dual_cache"]
        assert r["sequence_parallel"] == (name == "tp2_sequence_parallel")
        assert r["weights"]["max_abs"] == 0.0, "the shards were copied from the reference"
        assert r["loss_abs_err"] <= LOSS_ATOL, (rank, r)
        assert r["grads"]["count"] == 27  # every parameter of the 4-layer model on each TP rank
        _assert_grads(r["grads"], rank)


def test_wrong_fc1_split_is_detected(results):
    """Negative control: giving rank 0 all of gate and rank 1 all of up moves the loss."""
    for r in checked(results, "tp2_naive_fc1_split"):
        assert r["loss_abs_err"] > 100 * LOSS_ATOL, r


def test_pipeline_parallel_1f1b_matches_reference(results):
    stages = checked(results, "pp2")
    assert [s["stage"] for s in stages] == [0, 1]
    assert [s["layers"] for s in stages] == [[1, 2], [3, 4]]
    assert [(s["has_embedding"], s["has_output_layer"]) for s in stages] == [(True, False), (False, True)]
    for rank, s in enumerate(stages):
        assert s["schedule_is_1f1b"]
        assert s["rotary_is_dual_cache"], "every stage has its own rotary module"
        _assert_grads(s["grads"], rank)
    assert stages[0]["loss"] is None
    assert stages[1]["loss_abs_err"] <= LOSS_ATOL, stages[1]


def test_pipeline_parallel_tied_embeddings_match_reference(results):
    """The last stage's output layer is the embedding's copy; both stages end with the full
    (input + output use) embedding gradient."""
    stages = checked(results, "pp2_tied_embeddings")
    assert [(s["has_embedding"], s["has_output_weight"]) for s in stages] == [(True, False), (False, True)]
    for rank, s in enumerate(stages):
        assert s["grads"]["count"] == (13 if rank == 0 else 14)
        _assert_grads(s["grads"], rank)
    assert stages[1]["loss_abs_err"] <= LOSS_ATOL, stages[1]


def test_data_parallel_ddp_matches_reference(results):
    for rank, r in enumerate(checked(results, "dp2_ddp")):
        assert r["dp"] == 2
        assert r["local_loss_differs_from_global"] > 100 * LOSS_ATOL, "ranks must see different data"
        assert r["loss_abs_err"] <= LOSS_ATOL, r
        _assert_grads(r["grads"], rank)


def test_data_parallel_distributed_optimizer_step_matches_reference(results):
    for rank, r in enumerate(checked(results, "dp2_distributed_optimizer")):
        assert r["step_ok"]
        assert r["loss_abs_err"] <= LOSS_ATOL, r
        # each rank owns half of the reduce-scattered gradient buffer
        assert r["grads"]["owned_elements"] * 2 == r["grads"]["total_elements"]
        _assert_grads(r["grads"], rank)
        assert r["ref_grad_norm"] > 1.0, "clipping at 1.0 must be active for this check to mean something"
        assert r["grad_norm_abs_err"] <= GRAD_RTOL * r["ref_grad_norm"], r
        assert r["ref_max_update"] > 100 * WEIGHT_ATOL
        assert r["weights_after_step"]["max_abs"] <= WEIGHT_ATOL, r["weights_after_step"]
        assert r["next_loss_moved"] > 100 * LOSS_ATOL, "the step must change the next loss"
        assert r["next_loss_abs_err"] <= LOSS_ATOL, r


@pytest.mark.parametrize("seq_len, long", [(16, False), (64, True)])
def test_context_parallel_rotary_chunks(results, seq_len, long):
    ranks = checked(results, "cp2_rotary")
    assert [r["cp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["rotary_is_dual_cache"]
        got = r["lengths"][str(seq_len)]
        assert got["long_factors"] == long
        assert got["local_rows"] == seq_len // 2
        assert got["positions_match"], "rank r holds chunks [r, 2cp-1-r]"
        assert got["angles_abs_err"] <= 1e-6
        assert got["reassembled_abs_err"] <= 1e-6
        assert got["rotary_seq_len"] == seq_len, "megatron's rule recovers the full length from a CP chunk"


def test_context_parallel_model_matches_reference(results):
    for rank in checked(results, "cp2_model"):
        assert rank["local_tokens"] == 16  # half of the 32-token sequence: chunks r and 3-r
        assert rank["loss_abs_err"] < LOSS_ATOL, rank
        assert rank["grads"]["max_rel"] < GRAD_RTOL, rank["grads"]
