"""The correctness sections of ``benchmarks/gpu_suite.py``: the model's numerics on this device
against the fp32 CPU reference, and the dual-cache rotary's angles to position 131,071."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import torch

from gpu_suite_measure import HERE, model_config, on_gpu, process_groups, rel_l2, sync

NUMERICS_TOLERANCES = {
    # relative L2 errors ||ours - ref|| / ||ref|| against the fp32 CPU reference, and the loss's
    # relative error. bf16 (8-bit mantissa, 2^-9 = 2e-3 per rounding) through 4 layers lands
    # between 1e-3 and 1e-2 (METHOD.md's range for bf16 operands); the bounds leave 2-4x room
    # over what bf16 on the CPU gave (RESULTS.md); a broken mask or rope moves the logits by
    # several times the bound (the section's ``sensitivity``).
    "bfloat16": {"logits_rel_l2": 3e-2, "loss_rel": 1e-3, "grads_rel_l2": 5e-2},
    # fp32 on another device/kernel: only reduction order differs (TF32 off, torch's default)
    "float32": {"logits_rel_l2": 1e-4, "loss_rel": 1e-5, "grads_rel_l2": 1e-3},
}
ANGLE_TOLERANCES = {
    # the device's fp32 angles vs transformers' longrope inv_freq times the positions on the CPU
    # in fp32: the same two fp32 inputs, one correctly rounded product
    "vs_transformers_fp32_max_ulp": 1.0,
    # vs the exact (fp64) angles: fp32 rounding of inv_freq and of the product, 2 x 2^-24
    "vs_fp64_max_rel": 2.5e-7,
}

# --- numerics --------------------------------------------------------------------------------------


def _numerics_cases(cfg, seq: int, seed: int = 0) -> dict:
    """A long micro-batch (one causal sequence past the window: the long factors) and a packed one
    (documents <= the window, positions restarting: the original RoPE), random tokens."""
    gen = torch.Generator().manual_seed(seed)
    window = cfg.original_max_position_embeddings
    cases = {}
    for kind in ("long", "packed"):
        tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen)
        if kind == "long":
            lengths = [seq]
        else:
            lengths, left = [], seq
            while left:
                n = min(left, int(torch.randint(max(2, window // 8), window + 1, (1,), generator=gen)))
                lengths.append(n)
                left -= n
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        cases[kind] = {"tokens": tokens, "labels": labels, "position_ids": positions, "cu_seqlens": cu,
                       "max_seqlen": max(lengths), "documents": len(lengths)}
    return cases


def _micro_batch(case: dict, device):
    from longrope2.data.mixed import MicroBatch

    kind = "long" if case["documents"] == 1 else "short"
    return MicroBatch(index=0, kind=kind, tokens=case["tokens"], labels=case["labels"],
                      loss_mask=torch.ones_like(case["tokens"], dtype=torch.float32),
                      position_ids=case["position_ids"], cu_seqlens=case["cu_seqlens"],
                      max_seqlen=case["max_seqlen"]).to(device)


def run_case(model, case: dict, device) -> dict:
    """Logits (no grad), the mean per-token loss through megatron's labels path, and its grads;
    the packed case goes in as the trainer passes it (``MicroBatch.packed_seq_params``)."""
    batch = _micro_batch(case, device)
    params = batch.packed_seq_params()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(batch.tokens, batch.position_ids, attention_mask=None, packed_seq_params=params)
    per_token = model(batch.tokens, batch.position_ids, attention_mask=None, labels=batch.labels,
                      packed_seq_params=params)
    loss = per_token.float().mean()
    loss.backward()
    return {"logits": logits.float().cpu(), "loss": loss.item(),
            "grads": {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}}


def _numerics_scaling(cfg, seq: int):
    from longrope2.rope import RopeScaling, longrope2_factors

    half = cfg.rotary_dim // 2
    original = cfg.original_max_position_embeddings
    target = max(seq, 2 * original)
    s = target / original
    crit = half // 2
    upper = torch.linspace(1.2 * s, 1.8 * s, half - crit).tolist()  # a LongRoPE2-shaped set
    factors = longrope2_factors(cfg.rotary_dim, cfg.rope_theta, original, target, crit, upper)
    return RopeScaling.from_factors(cfg.rope_geometry, target, factors.tolist())


def numerics_reference(in_path: str, out_path: str) -> int:
    """The fp32 CPU reference (run in a subprocess with CUDA hidden, so it is the CPU path the
    tests exercise: gloo, the CPU shims): same weights and inputs, logits / loss / grads."""
    from longrope2.model.config import ModelConfig
    from longrope2.model.gpt import build_gpt_model
    from longrope2.rope import RopeScaling

    data = torch.load(in_path, weights_only=False)
    cfg = ModelConfig(**data["model"])
    scaling = RopeScaling.from_factors(cfg.rope_geometry, data["target"], data["long_factor"])
    cpu = torch.device("cpu")
    with process_groups(data["seed"]):
        model = build_gpt_model(cfg, rope_scaling=scaling, params_dtype=torch.float32, seq_length=data["seq"])
        _load_weights(model, data["state"], torch.float32)
        out = {kind: run_case(model, case, cpu) for kind, case in data["cases"].items()}
        # what the comparison must be able to see: the same weights with the packed documents run
        # as one causal sequence (no document boundaries), and the long micro-batch with the
        # original RoPE instead of the long factors
        packed = data["cases"]["packed"]
        one_sequence = {**packed, "cu_seqlens": torch.tensor([0, data["seq"]], dtype=torch.int32), "documents": 1,
                        "max_seqlen": data["seq"]}
        sensitivity = {"packed_as_one_sequence": rel_l2(_logits(model, one_sequence, cpu), out["packed"]["logits"])}
        model.rotary_pos_emb.set_scaling(None)
        sensitivity["long_with_the_original_rope"] = rel_l2(_logits(model, data["cases"]["long"], cpu),
                                                            out["long"]["logits"])
        out["sensitivity"] = sensitivity
    torch.save(out, out_path)
    return 0


def _logits(model, case: dict, device) -> torch.Tensor:
    batch = _micro_batch(case, device)
    with torch.no_grad():
        return model(batch.tokens, batch.position_ids, attention_mask=None,
                     packed_seq_params=batch.packed_seq_params()).float().cpu()


def _load_weights(model, state: dict, dtype) -> None:
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")


def _attention_ops(model, case: dict, device) -> list[str]:
    """Names of the attention ops and kernels one forward runs (torch profiler): which SDPA
    backend (flash, memory-efficient, cuDNN, math) the project's attention actually gets."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu() else [])
    batch = _micro_batch(case, device)
    with torch.no_grad(), profile(activities=activities) as prof:
        model(batch.tokens, batch.position_ids, attention_mask=None, packed_seq_params=batch.packed_seq_params())
        sync()
    words = ("scaled_dot_product", "flash", "fmha", "attention", "sdpa", "cudnn", "efficient")
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)})


def numerics(ctx) -> dict:
    from longrope2.model.gpt import build_gpt_model

    # a larger init than training's 0.02 so that attention is far from uniform: a wrong mask or
    # rope must move the logits well past bf16's noise (``sensitivity`` records by how much)
    cfg = dataclasses.replace(model_config(ctx.sizes["numerics_model"]), init_method_std=ctx.sizes["numerics_init_std"])
    seq = ctx.sizes["numerics_seq"]
    scaling = _numerics_scaling(cfg, seq)
    cases = _numerics_cases(cfg, seq)
    result = {"model": dataclasses.asdict(cfg), "seq_length": seq, "rope_target": scaling.max_position_embeddings,
              "packed_documents": cases["packed"]["documents"], "packed_max_document": cases["packed"]["max_seqlen"],
              "reference": "float32 on the CPU (subprocess, CUDA hidden)", "tolerances": NUMERICS_TOLERANCES,
              "runs": {}}
    inputs, output = ctx.work / "numerics_inputs.pt", ctx.work / "numerics_reference.pt"
    with process_groups(seed=7):
        torch.manual_seed(7)
        source = build_gpt_model(cfg, rope_scaling=scaling, params_dtype=torch.float32, seq_length=seq)
        state = {k: v.detach().float().cpu() for k, v in source.state_dict().items() if isinstance(v, torch.Tensor)}
        del source
    torch.save({"model": dataclasses.asdict(cfg), "target": scaling.max_position_embeddings,
                "long_factor": list(scaling.long_factor), "seed": 7, "seq": seq, "state": state, "cases": cases}, inputs)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "gpu_suite.py"), "--numerics-reference", str(inputs), str(output)],
                          env=env, capture_output=True, text=True, timeout=max(10.0, ctx.remaining()))
    if proc.returncode != 0:
        raise RuntimeError(f"fp32 CPU reference failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result["reference_s"] = time.perf_counter() - start
    reference = torch.load(output, weights_only=False)
    result["sensitivity"] = reference.pop("sensitivity")
    result["sensitivity_over_bf16_tolerance"] = (min(result["sensitivity"].values())
                                                 / NUMERICS_TOLERANCES["bfloat16"]["logits_rel_l2"])
    ctx.partial(result)

    for dtype_name in ctx.sizes["numerics_dtypes"]:
        dtype = getattr(torch, dtype_name)
        tol = NUMERICS_TOLERANCES[dtype_name]
        with process_groups(seed=7):
            model = build_gpt_model(cfg, rope_scaling=scaling, params_dtype=dtype, seq_length=seq)
            _load_weights(model, state, dtype)
            for kind, case in cases.items():
                ours, ref = run_case(model, case, ctx.device), reference[kind]
                names = sorted(ref["grads"])
                if sorted(ours["grads"]) != names:
                    raise RuntimeError(f"{kind}: gradients of different parameters: {sorted(ours['grads'])} vs {names}")
                flat_ours = torch.cat([ours["grads"][n].flatten() for n in names])
                flat_ref = torch.cat([ref["grads"][n].flatten() for n in names])
                per_param = {n: rel_l2(ours["grads"][n], ref["grads"][n]) for n in names}
                worst = max(per_param, key=per_param.get)
                row = {
                    "logits_rel_l2": rel_l2(ours["logits"], ref["logits"]),
                    "logits_max_abs": float((ours["logits"] - ref["logits"]).abs().max()),
                    "logits_ref_rms": float(ref["logits"].pow(2).mean().sqrt()),
                    "loss": ours["loss"], "loss_ref": ref["loss"],
                    "loss_rel": abs(ours["loss"] - ref["loss"]) / abs(ref["loss"]),
                    "grads_rel_l2": rel_l2(flat_ours, flat_ref),
                    "grads_cosine": float(torch.nn.functional.cosine_similarity(flat_ours.double(), flat_ref.double(),
                                                                                dim=0)),
                    "worst_param": worst, "worst_param_rel_l2": per_param[worst],
                    "tolerances": tol,
                }
                row["within_tolerance"] = all(row[k] <= v for k, v in tol.items())
                try:
                    row["attention_ops"] = _attention_ops(model, case, ctx.device)
                except Exception as error:  # the profiler is a report, not a comparison
                    row["attention_ops_error"] = f"{type(error).__name__}: {error}"
                result["runs"][f"{dtype_name}/{kind}"] = row
                ctx.partial(result)
            del model
    result["all_within_tolerance"] = all(r["within_tolerance"] for r in result["runs"].values())
    return result


# --- rotary angles to 131,071 ---------------------------------------------------------------------


def rotary_angles(ctx) -> dict:
    """The dual-cache rotary's angles for LLaMA3-8B at 128k (positions 0..131,071, the long
    factors) on this device against transformers' ``longrope`` frequencies times the positions in
    fp32 on the CPU, and against exact fp64 angles; plus the short/long switch at the window."""
    import transformers
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longrope2.rope import RopeScaling, longrope2_factors
    from longrope2.rope.rotary import DualCacheRotaryEmbedding

    cfg = model_config("llama3_8b")
    length = ctx.sizes["angles_length"]
    original, dim = cfg.original_max_position_embeddings, cfg.rotary_dim
    s = length / original
    crit = 30  # the paper's real critical dimension for LLaMA3-8B
    upper = torch.linspace(1.1 * s, 1.9 * s, dim // 2 - crit).tolist()
    factors = longrope2_factors(dim, cfg.rope_theta, original, length, crit, upper).tolist()
    scaling = RopeScaling.from_factors(cfg.rope_geometry, length, factors)
    rotary = DualCacheRotaryEmbedding(kv_channels=cfg.head_dim, rotary_percent=cfg.rotary_percent,
                                      rotary_base=cfg.rope_theta, original_max_position_embeddings=original,
                                      scaling=scaling).to(ctx.device)
    emb = rotary(length)  # [s, 1, 1, dim] = cat(angles, angles)
    device_angles = emb[:, 0, 0, : dim // 2]
    device_cos = torch.cos(device_angles).cpu().double()
    device_angles = device_angles.float().cpu()

    style = "rope_parameters" if int(transformers.__version__.split(".")[0]) >= 5 else "rope_scaling"
    hf_config = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                            head_dim=cfg.head_dim, **scaling.to_hf_config(style))
    hf_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=length)
    positions = torch.arange(length, dtype=torch.float32)
    hf_angles = positions[:, None] * hf_inv.float()[None, :]
    ulp = torch.from_numpy(np.spacing(hf_angles.abs().numpy())).float()
    exact_inv = 1.0 / (torch.tensor(factors, dtype=torch.float64)
                       * cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    exact = torch.arange(length, dtype=torch.float64)[:, None] * exact_inv[None, :]
    error = (device_angles.double() - exact).abs()
    positive = exact > 0
    result = {
        "model": "llama3_8b", "rotary_dim": dim, "positions": length, "max_position": length - 1,
        "critical_dim": crit, "device": str(ctx.device), "angle_dtype": str(emb.dtype).removeprefix("torch."),
        "vs_transformers_fp32_max_ulp": float(((device_angles - hf_angles).abs() / ulp.clamp_min(1e-45)).max()),
        "vs_transformers_fp32_max_abs": float((device_angles - hf_angles).abs().max()),
        "vs_fp64_max_rel": float((error[positive] / exact[positive]).max()),
        "vs_fp64_max_abs_rad": float(error.max()),
        "cos_vs_fp64_max_abs": float((device_cos - torch.cos(exact)).abs().max()),
        "fp32_spacing_at_largest_angle_rad": float(np.spacing(np.float32(exact.max()))),
        "tolerances": ANGLE_TOLERANCES,
    }
    # HF's switch: the short set up to the window, the long set past it
    short = rotary(original)[:, 0, 0, : dim // 2].float().cpu()
    long_ = rotary(original + 1)[:, 0, 0, : dim // 2].float().cpu()
    result["short_factors_at_window"] = bool(torch.equal(
        short, torch.arange(original, dtype=torch.float32)[:, None] * scaling.short_inv_freq.float()[None, :]))
    result["long_factors_past_window"] = bool(torch.equal(
        long_, torch.arange(original + 1, dtype=torch.float32)[:, None] * scaling.long_inv_freq.float()[None, :]))
    result["within_tolerance"] = (result["vs_transformers_fp32_max_ulp"] <= ANGLE_TOLERANCES["vs_transformers_fp32_max_ulp"]
                                  and result["vs_fp64_max_rel"] <= ANGLE_TOLERANCES["vs_fp64_max_rel"]
                                  and result["short_factors_at_window"] and result["long_factors_past_window"])
    return result


