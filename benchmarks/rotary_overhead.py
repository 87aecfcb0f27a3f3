"""Step-time overhead of the dual-cache rotary vs megatron's stock ``RotaryEmbedding``.

Two copies of the same model (same weights, same attention factor) in one process, differing
only in ``GPTModel.rotary_pos_emb``; forward + backward steps alternate between them so drift
in machine load hits both alike; the median step times and their ratio are reported, for a long
micro-batch (one sequence, rescaled RoPE) and a short packed one (THD, original RoPE).

    OMP_NUM_THREADS=1 python benchmarks/rotary_overhead.py                       # tiny, CPU
    OMP_NUM_THREADS=1 python benchmarks/rotary_overhead.py --model smollm2_135m --layers 2 --seq-length 2048
    python benchmarks/rotary_overhead.py --model smollm2_135m --seq-length 16384   # GPU: full model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (CPU: keep it small)")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from longrope2.model.config import ModelConfig
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    cfg = ModelConfig.from_name(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    initialize_parallel(ParallelDims(world_size=1), seed=1234)
    try:
        results = compare(cfg, args.seq_length, args.steps, args.warmup)
    finally:
        destroy_parallel()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def compare(cfg, seq_length: int, steps: int, warmup: int) -> dict:
    """Median forward + backward step time of the dual-cache rotary and megatron's stock one on
    ``cfg`` (same weights), for a long and a packed micro-batch of ``seq_length`` tokens.
    Needs megatron's process groups (``initialize_parallel``); bf16 on GPU, fp32 on CPU."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.packed_seq_params import PackedSeqParams

    from longrope2.model.gpt import build_gpt_model
    from longrope2.parallel import default_device
    from longrope2.rope import RopeScaling

    window = cfg.original_max_position_embeddings
    if seq_length <= window:
        cfg = dataclasses.replace(cfg, original_max_position_embeddings=seq_length // 2)
        window = seq_length // 2
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scaling = RopeScaling.from_method("yarn", cfg.rope_geometry, 2 * seq_length)
    dual = build_gpt_model(cfg, rope_scaling=scaling, params_dtype=dtype, seq_length=seq_length)
    stock = build_gpt_model(cfg, rope_scaling=scaling, params_dtype=dtype, seq_length=seq_length)
    stock.load_state_dict(dual.state_dict())
    stock.rotary_pos_emb = RotaryEmbedding(
        kv_channels=cfg.head_dim, rotary_percent=cfg.rotary_percent, rotary_interleaved=False,
        rotary_base=cfg.rope_theta, use_cpu_initialization=device.type != "cuda",
    ).to(device)

    S = seq_length
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, S), generator=gen).to(device)
    labels = torch.randint(0, cfg.vocab_size, (1, S), generator=gen).to(device)
    positions = torch.arange(S, device=device)[None]
    pieces = [window // 2] * (2 * S // window)
    cu = torch.tensor([0, *torch.tensor(pieces).cumsum(0).tolist()], dtype=torch.int32, device=device)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=window // 2,
                             max_seqlen_kv=window // 2)

    def step(model, packed_params) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(tokens, positions, attention_mask=None, labels=labels, packed_seq_params=packed_params).float().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {"model": cfg.name, "layers": cfg.num_layers, "seq_length": S, "device": str(device),
               "dtype": str(dtype), "steps": steps}
    for name, params in (("long", None), ("short_packed", packed)):
        times = {"dual_cache": [], "stock": []}
        for i in range(warmup + steps):
            order = (("dual_cache", dual), ("stock", stock)) if i % 2 == 0 else (("stock", stock), ("dual_cache", dual))
            for label, model in order:
                model.zero_grad(set_to_none=True)
                t = step(model, params)
                if i >= warmup:
                    times[label].append(t)
        d, s = statistics.median(times["dual_cache"]), statistics.median(times["stock"])
        results[name] = {"dual_cache_s": d, "stock_s": s, "ratio": d / s, "overhead_pct": 100 * (d / s - 1)}
        print(f"{name:>13}: dual-cache {d * 1e3:8.2f} ms  stock {s * 1e3:8.2f} ms  ratio {d / s:.4f} "
              f"({100 * (d / s - 1):+.2f}%)  [{cfg.name}, {cfg.num_layers} layers, {S} tokens, {device}]", flush=True)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
