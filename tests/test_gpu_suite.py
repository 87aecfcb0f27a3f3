"""benchmarks/gpu_suite.py in its CPU smoke mode (tiny sizes, the GPU run's code paths), so the
prepared GPU script cannot rot between the rare GPU runs: every section runs and reports finite
numbers; the numerics (bf16 and fp32 on the CPU vs the fp32 reference subprocess) and the rotary
angles (vs transformers' ``longrope`` frequencies and exact fp64) are within the stated
tolerances; the training, scorer and search-cost numbers follow from their recorded inputs (the
dry run's estimate for the same config, the extrapolation formula); a failing section is recorded
while the rest run; the time budget stops the suite cleanly; bad arguments exit 2."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite import PROFILES, SECTIONS  # noqa: E402
from gpu_suite_numerics import ANGLE_TOLERANCES, NUMERICS_TOLERANCES  # noqa: E402

SMOKE = PROFILES["smoke"]


def run_suite(tmp_path: Path, *args: str, timeout: float = 900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - start
    path = tmp_path / "out" / "gpu_suite.json"
    assert path.is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text()), wall


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    proc, results, _ = run_suite(tmp)
    return proc, results["sections"], tmp


def _numbers(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, float):
        yield path, value


def test_every_section_runs_and_reports_finite_numbers(smoke):
    proc, sections, tmp = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(sections) == SECTIONS
    assert all(data["status"] == "ok" for data in sections.values()), {k: v.get("error") for k, v in sections.items()}
    runs = sections["training"]["runs"]
    assert list(runs) == [f"{length}/{kind}" for length in SMOKE["train_lengths"] for kind in ("long", "packed")]
    assert all(run["status"] == "ok" for run in runs.values())
    bad = [(path, value) for path, value in _numbers(sections) if not math.isfinite(value)]
    assert not bad, bad
    report = (tmp / "out" / "gpu_suite.md").read_text()
    for title in ("## Status", "## Numerics", "## Rotary angles to position 131,071", "## Training throughput",
                  "## Dual-cache rotary", "## Needle scorer", "## Estimated search cost"):
        assert title in report


def test_numerics_bf16_and_fp32_within_the_stated_tolerances(smoke):
    num = smoke[1]["numerics"]
    assert set(num["runs"]) == {f"{d}/{k}" for d in SMOKE["numerics_dtypes"] for k in ("long", "packed")}
    window = num["model"]["original_max_position_embeddings"]
    assert num["seq_length"] > window  # the long case runs the long factors
    assert num["packed_documents"] > 1 and num["packed_max_document"] <= window
    for key, run in num["runs"].items():
        dtype = key.split("/")[0]
        assert run["tolerances"] == NUMERICS_TOLERANCES[dtype]
        for metric, tolerance in NUMERICS_TOLERANCES[dtype].items():
            assert run[metric] <= tolerance, (key, metric, run[metric])
        assert run["within_tolerance"] and run["grads_cosine"] > 0.99
        # random init: every token's loss is ~ln(vocab) (512 for the tiny model)
        assert abs(run["loss_ref"] - math.log(num["model"]["vocab_size"])) < 0.5
        assert any("scaled_dot_product" in op for op in run["attention_ops"]), run.get("attention_ops_error")
    # the check can fail: a broken document mask or rope moves the logits far past the bf16 bound
    assert set(num["sensitivity"]) == {"packed_as_one_sequence", "long_with_the_original_rope"}
    assert min(num["sensitivity"].values()) > 5 * NUMERICS_TOLERANCES["bfloat16"]["logits_rel_l2"]
    for kind in ("long", "packed"):
        bf16, fp32 = num["runs"][f"bfloat16/{kind}"], num["runs"][f"float32/{kind}"]
        # bf16 really ran in bf16 (errors of bf16 rounding, not zero) and fp32 agrees far tighter
        assert 1e-4 < bf16["logits_rel_l2"] and 1e-4 < bf16["grads_rel_l2"]
        assert fp32["logits_rel_l2"] < bf16["logits_rel_l2"] / 10 and fp32["grads_rel_l2"] < bf16["grads_rel_l2"] / 10


def test_rotary_angles_to_position_131071(smoke):
    angles = smoke[1]["rotary_angles"]
    assert angles["positions"] == 131072 and angles["max_position"] == 131071 and angles["rotary_dim"] == 128
    assert angles["vs_transformers_fp32_max_ulp"] <= ANGLE_TOLERANCES["vs_transformers_fp32_max_ulp"]
    assert angles["vs_fp64_max_rel"] <= ANGLE_TOLERANCES["vs_fp64_max_rel"]
    # fp32 at angles ~1.3e5 rad resolves ~8e-3 rad: the error is that rounding (of inv_freq, as in
    # transformers, and of the product), a couple of ulp, no more
    assert angles["vs_fp64_max_abs_rad"] <= 2 * angles["fp32_spacing_at_largest_angle_rad"]
    assert angles["cos_vs_fp64_max_abs"] <= angles["vs_fp64_max_abs_rad"] + 1e-6
    assert angles["short_factors_at_window"] and angles["long_factors_past_window"] and angles["within_tolerance"]


def test_training_numbers_follow_from_the_steps_and_the_dry_run(smoke):
    from longrope2.model.config import ModelConfig
    from longrope2.train.config import TrainConfig
    from longrope2.train.plan import GIB, plan_train

    cfg = ModelConfig.from_name(SMOKE["train_model"])
    runs = smoke[1]["training"]["runs"]
    for length in SMOKE["train_lengths"]:
        long, packed = runs[f"{length}/long"], runs[f"{length}/packed"]
        assert long["tokens_per_step"] == packed["tokens_per_step"] == SMOKE["tokens_per_step"]
        run_micro = long["micro_batches_per_step"]
        for run, shorts in ((long, 0), (packed, run_micro)):
            steps = run["steps"]
            assert len(steps) == SMOKE["train_warmup"] + SMOKE["train_steps"]
            assert all(step["short_micro_batches"] == shorts for step in steps)
            assert all(5.5 < step["loss"] < 7.0 for step in steps)  # ~ln(512) at random init
            timed = steps[SMOKE["train_warmup"]:]
            assert run["step_s"] == pytest.approx(statistics.median(s["step_s"] for s in timed))
            assert run["tokens_per_s"] == pytest.approx(run["tokens_per_step"] / run["step_s"])
            assert run["mfu"] == pytest.approx(run["causal_tflops"] * 1e12 / (run["peak_tflops"] * 1e12))
            # the estimate is the dry run's for the very config the trainer ran
            _, memory = plan_train(TrainConfig.from_yaml(run["config"]), 1, 1, 80.0)
            assert run["estimate_gib"]["total"] == pytest.approx(memory.total / GIB)
            assert run["peak_allocated_gib"] > 0
        assert run_micro == SMOKE["tokens_per_step"] // length
        # long micro-batches: one document each, the trainer's own FLOP convention exactly
        assert long["steps"][-1]["causal_flops"] == pytest.approx(run_micro * length * cfg.flops_per_token(length))
        # packed: many documents, attention only inside each, so fewer causal FLOPs
        assert packed["documents_per_step"] > run_micro
        assert packed["steps"][-1]["causal_flops"] < long["steps"][-1]["causal_flops"]


def test_rotary_overhead_and_scorer_report_times_and_memory(smoke):
    from gpu_suite_measure import scorer_forward_flops_per_token

    from longrope2.model.config import ModelConfig

    rotary = smoke[1]["rotary_overhead"]
    for kind in ("long", "short_packed"):
        assert rotary[kind]["dual_cache_s"] > 0 and rotary[kind]["stock_s"] > 0
        assert rotary[kind]["ratio"] == pytest.approx(rotary[kind]["dual_cache_s"] / rotary[kind]["stock_s"])
    scorer = smoke[1]["scorer"]
    cfg = ModelConfig.from_name(SMOKE["scorer_model"])
    assert set(scorer["runs"]) == {f"{d}/{n}" for d in SMOKE["scorer_dtypes"] for n in SMOKE["scorer_lengths"]}
    for run in scorer["runs"].values():
        assert len(run["candidate_s"]) == len(run["needle_ppl"]) == SMOKE["scorer_candidates"]
        assert all(ppl > 1 for ppl in run["needle_ppl"]) and run["peak_allocated_gib"] > 0
        flops = scorer["documents_per_candidate"] * run["length"] * scorer_forward_flops_per_token(cfg, run["length"])
        assert run["forward_tflops"] == pytest.approx(flops / run["s_per_candidate"] / 1e12)


def test_search_cost_follows_its_formula(smoke):
    from longrope2.model.config import ModelConfig

    cost, scorer = smoke[1]["search_cost"], smoke[1]["scorer"]
    source = scorer["runs"][cost["source_run"]]
    assert source["length"] == max(SMOKE["scorer_lengths"])
    assert cost["rate_tflops"] == pytest.approx(source["forward_tflops"])
    assert (cost["candidates"], cost["documents"], cost["length"], cost["gpus"]) == (64 + 40 * 32 + 4, 10, 131072, 64)
    llama = ModelConfig.from_name("llama3_8b")
    L = cost["length"]
    forward = L * (llama.flops_per_token(L) / 3 - 2 * llama.vocab_size * llama.hidden_size)
    assert cost["s_per_document"] == pytest.approx(forward / (cost["rate_tflops"] * 1e12))
    assert cost["wall_hours"] == pytest.approx(cost["candidates"] * cost["documents"] * cost["s_per_document"]
                                               / cost["gpus"] / 3600)
    assert cost["dry_run_fits"] and 16 < cost["dry_run_memory_gib"] < 80  # 16 GB of bf16 weights alone


def test_a_failing_section_is_recorded_and_the_rest_run(tmp_path):
    proc, results, _ = run_suite(tmp_path, "--sections", "calibration,scorer,search_cost,rotary_angles",
                                 "--set", 'scorer_model="no_such_model"')
    sections = results["sections"]
    assert proc.returncode == 1
    assert sections["scorer"]["status"] == "error" and "no_such_model" in sections["scorer"]["error"]
    assert sections["search_cost"]["status"] == "error" and "scorer" in sections["search_cost"]["error"]
    assert sections["calibration"]["status"] == sections["rotary_angles"]["status"] == "ok"


def test_the_time_budget_stops_the_suite_cleanly(tmp_path):
    budget = 4.0
    proc, results, wall = run_suite(tmp_path, "--sections", "environment,numerics,training", "--budget-s", str(budget))
    sections = results["sections"]
    assert proc.returncode == 1
    assert set(sections) == {"environment", "numerics", "training"}
    statuses = [sections["environment"]["status"], sections["numerics"]["status"],
                *(run["status"] for run in sections["training"]["runs"].values())]
    assert len(statuses) == 2 + 2 * len(SMOKE["train_lengths"])
    assert set(statuses) <= {"ok", "interrupted", "skipped"} and statuses[-1] == "skipped"
    stopped = [s for s in (sections["environment"], sections["numerics"], *sections["training"]["runs"].values())
               if s["status"] != "ok"]
    assert stopped and all("time budget" in s["error"] for s in stopped)
    assert results["suite"]["elapsed_s"] < budget + 30  # stopped at the budget, not after the work


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for args in (["--sections", "bogus"], ["--set", "no_such_size=1"]):
        proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
