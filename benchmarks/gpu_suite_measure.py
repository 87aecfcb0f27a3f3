"""The performance sections of ``benchmarks/gpu_suite.py`` (environment, calibration, training,
rotary overhead, scorer, search cost) and the helpers every section shares; the correctness
sections are in ``gpu_suite_numerics.py``. Each section returns a JSON-ready dict
(``ctx.partial`` saves what it has so far, so a kill loses little).

Every section goes through the project's own code: ``build_gpt_model`` (megatron-core GPTModel,
dual-cache rotary, our SDPA core attention off TransformerEngine), ``Trainer.train_step``,
``plan.train_memory`` (the ``--dry-run`` estimate), ``NeedleScorer`` and the rotary benchmark's
``compare``. The GPU and the CPU smoke run differ only in the sizes (``gpu_suite.PROFILES``).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 2**30
HERE = Path(__file__).resolve().parent

# A small LLaMA for the numerics: big enough for real kernels (head_dim 64, GQA 4:1), small
# enough that the fp32 CPU reference of an 8k sequence takes seconds.
SMALL_LLAMA = dict(name="small_llama", num_layers=4, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                   num_query_groups=2, head_dim=64, vocab_size=8192, rope_theta=10000.0,
                   original_max_position_embeddings=2048)


# --- helpers --------------------------------------------------------------------------------------


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if on_gpu():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak memory since ``reset_peak``: the CUDA caching allocator's on GPU, the process's
    resident high-water mark on CPU (it never resets: a ceiling, not a per-run figure)."""
    if on_gpu():
        sync()
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "memory_source": "torch.cuda"}
    return {"peak_allocated_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "memory_source": "ru_maxrss (CPU process high-water mark)"}


def allocated_gib() -> float | None:
    return torch.cuda.memory_allocated() / GIB if on_gpu() else None


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-300))


def model_config(name: str):
    from longrope2.model.config import ModelConfig

    return ModelConfig(**SMALL_LLAMA) if name == "small_llama" else ModelConfig.from_name(name)


@contextmanager
def process_groups(seed: int = 1234):
    """megatron's process groups for one process (nccl on GPU, gloo + the CPU shims on CPU)."""
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(world_size=1), seed=seed)
    try:
        yield
    finally:
        destroy_parallel()
        free_memory()


def reset_parallel() -> None:
    """After a failed section: whatever it left initialized (megatron's groups, the process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longrope2.parallel import destroy_parallel

    if parallel_state.model_parallel_is_initialized() or dist.is_initialized():
        destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    free_memory()


def causal_flops(cfg, lengths) -> float:
    """Training FLOPs of documents of these lengths with ``ModelConfig.flops_per_token``'s
    convention (6 x matmul parameters + causal attention at half the square), each document
    attending only to itself: sum of ``n * flops_per_token(n)``."""
    return float(sum(int(n) * cfg.flops_per_token(int(n)) for n in lengths))


def scorer_forward_flops_per_token(cfg, length: int) -> float:
    """Forward FLOPs per token of the needle scorer: a third of ``flops_per_token`` (forward only)
    less the LM head, which the scorer runs only at the few answer positions."""
    return cfg.flops_per_token(length) / 3.0 - 2.0 * cfg.vocab_size * cfg.hidden_size


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or os.environ.get("LONGROPE2_COMMIT")


# --- environment and calibration ------------------------------------------------------------------


def environment(ctx) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import megatron.core

    from longrope2.model.gpt import transformer_engine_available

    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    te = transformer_engine_available()
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "megatron_core": pkg("megatron-core"), "megatron_core_path": str(Path(megatron.core.__file__).parent),
        "transformers": pkg("transformers"),
        "device": torch.cuda.get_device_name() if on_gpu() else "cpu", "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "git_commit": _git_commit() or os.environ.get("LONGROPE2_COMMIT"),
        "transformer_engine": te, "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "core_attention": "TransformerEngine layer spec" if te else
        "longrope2.model.attention.SDPAttention (megatron local spec, torch SDPA)",
        "profile": ctx.profile_name,
    }
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=props.total_memory / GIB, multiprocessors=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}",
                    sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                  "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                  "math": torch.backends.cuda.math_sdp_enabled()},
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def calibration(ctx) -> dict:
    """The matrix-product ceiling of this device (bf16 on GPU, fp32 on CPU): the median of timed
    ``n x n x n`` products on random data after warm-ups."""
    n = ctx.sizes["matmul_n"]
    device = ctx.device
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        sync()
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        sync()
        if i >= 3:
            times.append((time.perf_counter() - start) / 5)
    median = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": median,
            "tflops": 2 * n**3 / median / 1e12}


# --- training throughput with the project's trainer -----------------------------------------------


def training_data(ctx, vocab: int) -> str:
    """The embedded books tokenized (hashed words) into an indexed dataset once per vocabulary."""
    from longrope2.data.indexed import indexed_exists, prepare_indexed
    from longrope2.data.tokenize import hashed_words

    low, high = ctx.sizes["doc_tokens"]
    prefix = ctx.work / f"books.hashed{vocab}.{low}-{high}"
    if not indexed_exists(prefix):
        prepare_indexed(prefix, hashed_words(vocab), vocab, (), low, high, seed=0, progress=False)
    return str(prefix)


def train_config_dict(ctx, length: int, kind: str, data: str) -> dict:
    sizes = ctx.sizes
    return {
        "model": sizes["train_model"], "output_dir": str(ctx.work / f"train_{length}_{kind}"),
        "seq_length": length, "global_batch_size": max(1, sizes["tokens_per_step"] // length),
        "train_steps": sizes["train_warmup"] + sizes["train_steps"], "save_interval": 0, "log_interval": 1,
        "dtype": sizes["train_dtype"], "tensorboard": False, "peak_tflops": ctx.peak_tflops(),
        "rope": {"method": "yarn", "target_length": length},
        "data": {"paths": [data], "short_fraction": 0.0 if kind == "long" else 1.0, "seed": 1234},
        "optim": {"lr": 2.0e-5, "warmup_steps": 1},
    }


def training(ctx, length: int, kind: str) -> dict:
    """``Trainer.train_step`` on one GPU: all-long or all-packed micro-batches of ``length``
    tokens, the same tokens per step; timed steps after warm-ups; peak memory next to the dry
    run's estimate (``plan.train_memory``) for the same config."""
    import yaml

    from longrope2.train.config import TrainConfig
    from longrope2.train.plan import GIB as PLAN_GIB, plan_train
    from longrope2.train.trainer import Trainer

    model_cfg = model_config(ctx.sizes["train_model"])
    data = training_data(ctx, model_cfg.vocab_size)
    config_path = ctx.work / f"train_{length}_{kind}.yaml"
    config_path.write_text(yaml.safe_dump(train_config_dict(ctx, length, kind, data)))
    config = TrainConfig.from_yaml(config_path)
    device_gib = torch.cuda.get_device_properties(0).total_memory / GIB if on_gpu() else 80.0
    plan_lines, estimate = plan_train(config, 1, 1, device_gib)
    result = {"config": str(config_path), "model": model_cfg.name, "kind": kind, "seq_length": length,
              "micro_batches_per_step": config.global_batch_size,
              "tokens_per_step": config.global_batch_size * length, "dtype": config.dtype,
              "peak_tflops": config.peak_tflops, "dry_run": plan_lines,
              "estimate_gib": {"weights": estimate.weights / PLAN_GIB, "grads": estimate.grads / PLAN_GIB,
                               "optimizer": estimate.optimizer / PLAN_GIB, "activations": estimate.activations / PLAN_GIB,
                               "recompute_working": estimate.working / PLAN_GIB, "logits": estimate.logits / PLAN_GIB,
                               "overhead": estimate.overhead / PLAN_GIB, "total": estimate.total / PLAN_GIB}}
    ctx.partial(result)
    free_memory()
    reset_peak()
    start = time.perf_counter()
    trainer = Trainer(config)
    try:
        result["setup_s"] = time.perf_counter() - start
        result["allocated_after_setup_gib"] = allocated_gib()
        steps = []
        for _ in range(config.train_steps):
            first = trainer.step * config.global_batch_size
            metrics = trainer.train_step()
            lengths = []
            for index in range(first, first + config.global_batch_size):
                cu = trainer.sampler[index].cu_seqlens
                lengths += (cu[1:] - cu[:-1]).tolist()
            metrics["causal_flops"] = causal_flops(model_cfg, lengths)
            metrics["documents"] = len(lengths)
            steps.append(metrics)
            result["steps"] = steps
            ctx.partial(result)
        result["allocated_steady_gib"] = allocated_gib()
        result.update(peak_memory())
    finally:
        trainer.close()
        del trainer
        free_memory()
    timed = steps[ctx.sizes["train_warmup"]:]
    step_s = statistics.median(m["step_s"] for m in timed)
    flops = statistics.median(m["causal_flops"] for m in timed)
    peak = config.peak_tflops * 1e12
    result.update(
        step_s=step_s, tokens_per_s=result["tokens_per_step"] / step_s,
        causal_tflops=flops / step_s / 1e12, mfu=flops / step_s / peak,
        mfu_trainer=statistics.median(m["mfu"] for m in timed) if all("mfu" in m for m in timed) else None,
        loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"],
        documents_per_step=statistics.median(m["documents"] for m in timed),
    )
    if ctx.calibration_tflops():
        result["fraction_of_measured_matmul"] = result["causal_tflops"] / ctx.calibration_tflops()
    estimate_allocated = result["estimate_gib"]["total"] - result["estimate_gib"]["overhead"]
    result["estimate_allocated_gib"] = estimate_allocated  # the estimate without the CUDA/NCCL overhead
    result["peak_over_estimate"] = result["peak_allocated_gib"] / estimate_allocated
    return result


# --- the rotary's step-time overhead --------------------------------------------------------------


def rotary_overhead(ctx) -> dict:
    sys.path.insert(0, str(HERE))
    from rotary_overhead import compare

    cfg = model_config(ctx.sizes["rotary_model"])
    with process_groups(seed=1234):
        result = compare(cfg, ctx.sizes["rotary_length"], ctx.sizes["rotary_steps"], ctx.sizes["rotary_warmup"])
    result["goal"] = "ratio < 1.01"
    return result


# --- the search scorer ----------------------------------------------------------------------------


def _candidate(cfg, length: int, k: int):
    """Candidate k: YaRN first, then LongRoPE2-shaped factor sets that differ per k."""
    from longrope2.rope import RopeScaling, longrope2_factors

    if k == 0:
        return RopeScaling.from_method("yarn", cfg.rope_geometry, length)
    half = cfg.rotary_dim // 2
    s = length / cfg.original_max_position_embeddings
    crit = max(1, half // 2 - k % 3)
    upper = torch.linspace((1.0 + 0.05 * (k % 5)) * s, 1.9 * s, half - crit).tolist()
    factors = longrope2_factors(cfg.rotary_dim, cfg.rope_theta, cfg.original_max_position_embeddings, length, crit,
                                upper)
    return RopeScaling.from_factors(cfg.rope_geometry, length, factors.tolist())


def scorer(ctx) -> dict:
    """``NeedleScorer.score`` per candidate (all needle documents) on the scorer model's
    architecture with random weights (seconds and memory depend on the shapes, not the values)."""
    from longrope2.data.books import load_books
    from longrope2.data.needle import make_needle_documents
    from longrope2.data.tokenize import hashed_words
    from longrope2.model.gpt import build_gpt_model
    from longrope2.search.scorer import NeedleScorer

    sizes = ctx.sizes
    cfg = model_config(sizes["scorer_model"])
    encode = hashed_words(cfg.vocab_size).encode
    books = [(b.title, b.text) for b in load_books(progress=False)]
    result = {"model": cfg.name, "weights": "random init of the preset's architecture (time and memory depend on "
                                            "the shapes only)",
              "documents_per_candidate": sizes["scorer_documents"], "runs": {}}
    for dtype_name in sizes["scorer_dtypes"]:
        dtype = getattr(torch, dtype_name)
        with process_groups(seed=3):
            model = build_gpt_model(cfg, params_dtype=dtype, seq_length=max(sizes["scorer_lengths"])).eval()
            weights_gib = allocated_gib()
            for length in sizes["scorer_lengths"]:
                documents = make_needle_documents(encode, books, length + 1, sizes["scorer_documents"], seed=0)
                needle = NeedleScorer(model, documents)
                needle.score(_candidate(cfg, length, 0))  # warm-up: kernels, allocator
                seconds, ppls, peaks = [], [], []
                for k in range(1, sizes["scorer_candidates"] + 1):
                    reset_peak()
                    start = time.perf_counter()
                    ppls.append(needle.score(_candidate(cfg, length, k)))
                    seconds.append(time.perf_counter() - start)
                    peaks.append(peak_memory())
                per_candidate = statistics.median(seconds)
                fwd_flops = sizes["scorer_documents"] * length * scorer_forward_flops_per_token(cfg, length)
                row = {"dtype": dtype_name, "length": length, "s_per_candidate": per_candidate,
                       "s_per_document": per_candidate / sizes["scorer_documents"], "candidate_s": seconds,
                       "needle_ppl": ppls, "peak_allocated_gib": max(p["peak_allocated_gib"] for p in peaks),
                       "memory_source": peaks[0]["memory_source"], "weights_gib": weights_gib,
                       "forward_flops_per_candidate": fwd_flops, "forward_tflops": fwd_flops / per_candidate / 1e12}
                result["runs"][f"{dtype_name}/{length}"] = row
                ctx.partial(result)
            del model
    return result


PAPER_SEARCH = {"candidates": 64 + 40 * (16 + 16) + 4, "documents": 10, "gpus": 64, "length": 131072,
                "model": "llama3_8b"}
"""The estimate's target: the paper's search (population 64 + 40 generations x (16 mutants + 16
crossovers), plus the 4 baselines we score) on 10 needle documents (the paper's 10 PG19 books)
of 131,072 tokens, LLaMA3-8B, 64 GPUs, each a worker."""


def search_cost(ctx, scorer_result: dict | None) -> dict:
    """Extrapolate the LLaMA3-8B 128k search from the measured scorer: the achieved forward rate
    R (causal FLOPs / s) of the longest bf16 run (else the longest run) applied to LLaMA3-8B's
    forward FLOPs at 128k; ideal pool (the CPU measurement gave 97.4% with 2 workers)."""
    from longrope2.search.run import NeedleConfig, SearchConfig
    from longrope2.train.plan import GIB as PLAN_GIB, plan_search

    if not scorer_result or not scorer_result.get("runs"):
        raise RuntimeError("needs the scorer section's measurements, and it has none")
    runs = list(scorer_result["runs"].values())
    bf16 = [r for r in runs if r["dtype"] == "bfloat16"]
    source = max(bf16 or runs, key=lambda r: r["length"])
    rate = source["forward_tflops"] * 1e12
    target = model_config(PAPER_SEARCH["model"])
    L, C, D, G = PAPER_SEARCH["length"], PAPER_SEARCH["candidates"], PAPER_SEARCH["documents"], PAPER_SEARCH["gpus"]
    per_document = L * scorer_forward_flops_per_token(target, L) / rate
    total_gpu_s = C * D * per_document
    device_gib = torch.cuda.get_device_properties(0).total_memory / GIB if on_gpu() else 80.0
    search_config = SearchConfig(model="llama3_8b", target_length=L, output_dir=str(ctx.work / "search_plan"),
                                 dtype="bfloat16", needle=NeedleConfig(documents=D))
    _, memory = plan_search(search_config, G, 8, device_gib)
    return {
        "formula": "T = C * D * L * f(LLaMA3-8B, L) / (R * G); f(M, L) = flops_per_token(L)/3 - 2*vocab*hidden "
                   "(forward, causal attention, LM head only at the answers); R = the scorer's measured "
                   "forward FLOP/s at its longest bf16 length",
        "source_run": f"{source['dtype']}/{source['length']}", "rate_tflops": rate / 1e12,
        "candidates": C, "documents": D, "length": L, "gpus": G,
        "forward_tflop_per_document": L * scorer_forward_flops_per_token(target, L) / 1e12,
        "s_per_document": per_document, "s_per_candidate": D * per_document,
        "gpu_hours": total_gpu_s / 3600, "wall_hours": total_gpu_s / G / 3600,
        "dry_run_memory_gib": memory.total / PLAN_GIB, "dry_run_fits": memory.fits, "device_gib": device_gib,
        "attention_share_source": _attention_share(model_config(scorer_result["model"]), source["length"]),
        "attention_share_target": _attention_share(target, L),
        "caveat": "R comes from a smaller model (narrower matmuls, head_dim 64 on SmolLM2 vs 128): LLaMA3-8B's "
                  "kernels likely run at least as fast, so T is more likely pessimistic than optimistic",
    }


def _attention_share(cfg, length: int) -> float:
    """The causal attention part of the scorer's forward FLOPs at ``length``."""
    attention = 2.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * length
    return attention / scorer_forward_flops_per_token(cfg, length)
