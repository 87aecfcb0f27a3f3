"""Peak memory and time of the SDPA core attention, forward + backward, on CPU: the masked path it
replaced (an S x S boolean mask for packed documents, K/V copied per query head) vs today's
``SDPAttention`` (per-document causal calls, ``enable_gqa``), for a packed and a long micro-batch.

    OMP_NUM_THREADS=1 python benchmarks/attention_memory.py --lengths 8192 16384 --out results/attention_memory_cpu.json

Every (path, kind, length) runs in its own process, and its peak is the growth of the process's
peak resident set (``ru_maxrss``) over what it held after building the inputs. One attention
layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64), fp32, batch 1; the packed
micro-batch holds documents of 64..S/4 tokens (log-uniform, seeded) filling S.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

HEADS, GROUPS, HEAD_DIM = 9, 3, 64


def _documents(total: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, int(math.exp(rng.uniform(math.log(64), math.log(total // 4)))))
        lengths.append(n)
        left -= n
    return lengths


def masked_attention(q, k, v, cu, scale):
    """The replaced path: one SDPA call with a block-diagonal causal S x S mask (packed) or
    is_causal (long), K/V repeated to the query heads."""
    import torch
    import torch.nn.functional as F

    q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = None
    if cu is not None:
        lengths = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        index = torch.arange(q.shape[2])
        mask = (doc[:, None] == doc[None, :]) & (index[:, None] >= index[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


def one(path: str, kind: str, length: int) -> dict:
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from longrope2.model.attention import SDPAttention
    from longrope2.parallel import ParallelDims, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1), seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               masked_softmax_fusion=False)
    g = torch.Generator().manual_seed(0)
    packed = kind == "packed"
    shape = (length, HEADS, HEAD_DIM) if packed else (length, 1, HEADS, HEAD_DIM)
    kv_shape = (length, GROUPS, HEAD_DIM) if packed else (length, 1, GROUPS, HEAD_DIM)
    q = torch.randn(shape, generator=g, requires_grad=True)
    k = torch.randn(kv_shape, generator=g, requires_grad=True)
    v = torch.randn(kv_shape, generator=g, requires_grad=True)
    lengths = _documents(length) if packed else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32) if packed else None
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths)) if packed else None
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if path == "masked":
        if packed:
            out = masked_attention(q[:, None], k[:, None], v[:, None], cu.long(), attention.softmax_scale)
        else:
            out = masked_attention(q, k, v, None, attention.softmax_scale)
    else:
        out = attention(q, k, v, None, packed_seq_params=params)
    out.float().square().sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "kind": kind, "length": length, "documents": len(lengths) if packed else 1,
            "peak_mib": (peak - before) / 1024, "seconds": seconds,
            "checksum": float(out.detach().double().sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=3, metavar=("PATH", "KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
        return 0
    rows = []
    for length in args.lengths:
        for kind in ("packed", "long"):
            for path in ("masked", "sdpattention"):
                done = subprocess.run([sys.executable, __file__, "--one", path, kind, str(length)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{path} {kind} {length} failed:\n{done.stderr[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{length:>6} {kind:<6} {path:<12} peak {r['peak_mib']:9.1f} MiB  {r['seconds']:7.2f} s",
                      flush=True)
    print("\n| length | micro-batch | masked path: peak MiB / s | SDPAttention: peak MiB / s | memory ratio | "
          "time ratio | outputs equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for length in args.lengths:
        for kind in ("packed", "long"):
            a, b = (next(r for r in rows if r["length"] == length and r["kind"] == kind and r["path"] == p)
                    for p in ("masked", "sdpattention"))
            equal = math.isclose(a["checksum"], b["checksum"], rel_tol=1e-5, abs_tol=1e-2)
            print(f"| {length:,} | {kind} ({a['documents']} documents) | {a['peak_mib']:.0f} / {a['seconds']:.2f} | "
                  f"{b['peak_mib']:.0f} / {b['seconds']:.2f} | {a['peak_mib'] / max(b['peak_mib'], 1):.1f}x | "
                  f"{a['seconds'] / b['seconds']:.2f}x | {'yes' if equal else 'NO'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
