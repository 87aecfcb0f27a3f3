"""Needle scorer vs HF transformers' full-logit forward: same model, same documents, same rope.

Ours: the megatron-core model with the dual-cache rotary, LM head only at the answer positions
(``longrope2.search.scorer``). Theirs: ``AutoModelForCausalLM`` with the same ``longrope`` rope
config and SDPA attention, full ``[s, vocab]`` logits, cross-entropy at the answer positions.
Both report the needle-PPL (a correctness check: they must agree) and time and peak memory per
document; the script prints the ratios. Peak memory is exact on GPU (``max_memory_allocated``);
on CPU it is the process's resident high-water mark, so HF's figure (taken second) includes ours.

    python benchmarks/scorer_vs_hf.py --checkpoint smollm2 --lengths 16384 --documents 2
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark (KB -> GB)


def hf_needle_ppl(hf, documents, device) -> float:
    total, count = 0.0, 0
    for doc in documents:
        inputs, labels, mask = doc.inputs_and_labels()
        with torch.no_grad():
            logits = hf(torch.tensor([inputs], device=device)).logits[0]  # [s, vocab]: the full logits
        nll = F.cross_entropy(logits.float(), torch.tensor(labels, device=device), reduction="none")
        mask_t = torch.tensor(mask, device=device, dtype=torch.bool)
        total += nll[mask_t].sum().item()
        count += int(mask_t.sum())
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    import transformers

    from longrope2.data import tokenize
    from longrope2.data.books import load_books
    from longrope2.data.needle import make_needle_documents
    from longrope2.model.config import ModelConfig
    from longrope2.model.gpt import build_gpt_model
    from longrope2.model.hf_convert import load_hf_into_megatron
    from longrope2.model.pretrained import load_hf_causal_lm
    from longrope2.parallel import ParallelDims, default_device, initialize_parallel
    from longrope2.rope.scaling import RopeScaling
    from longrope2.search.scorer import NeedleScorer

    dtype = getattr(torch, args.dtype)
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1))
    device = default_device()
    hf, hf_tokenizer = load_hf_causal_lm(args.checkpoint)
    cfg = ModelConfig.from_hf_config(hf.config, name=args.checkpoint)
    ours = build_gpt_model(cfg, params_dtype=dtype)
    load_hf_into_megatron(ours, {k: v.to(dtype) for k, v in hf.state_dict().items()}, cfg)
    ours = ours.to(device).eval()
    tokenizer = tokenize.from_hf(hf_tokenizer)
    books = [(b.title, b.text) for b in load_books(progress=False)]
    style = "rope_parameters" if int(transformers.__version__.split(".")[0]) >= 5 else "rope_scaling"

    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "checkpoint": args.checkpoint, "dtype": args.dtype, "lengths": {}}
    for length in args.lengths:
        scaling = RopeScaling.from_method("yarn", cfg.rope_geometry, length)
        documents = make_needle_documents(tokenizer.encode, books, length + 1, args.documents, seed=0,
                                          bos_token_id=tokenizer.bos_token_id)
        scorer = NeedleScorer(ours, documents)
        if torch.cuda.is_available():
            scorer.score(scaling)  # warm-up (kernels, caches)
        _peak_reset()
        start = time.perf_counter()
        ours_ppl = scorer.score(scaling)
        ours_s, ours_gb = (time.perf_counter() - start) / len(documents), _peak_gb()

        hf_config = hf.config.to_dict()
        hf_config.update(scaling.to_hf_config(style))
        hf_config.pop("rope_scaling" if style == "rope_parameters" else "rope_parameters", None)
        reference = transformers.AutoModelForCausalLM.from_config(
            type(hf.config).from_dict(hf_config), attn_implementation="sdpa", dtype=dtype)
        missing, unexpected = reference.load_state_dict(hf.state_dict(), strict=False)
        tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
        assert set(missing) <= tied and not unexpected, (missing, unexpected)
        reference = reference.to(device=device, dtype=dtype).eval()
        try:
            if torch.cuda.is_available():
                hf_needle_ppl(reference, documents[:1], device)  # warm-up
            _peak_reset()
            start = time.perf_counter()
            hf_ppl = hf_needle_ppl(reference, documents, device)
            hf_s, hf_gb = (time.perf_counter() - start) / len(documents), _peak_gb()
        except torch.OutOfMemoryError as error:  # the full-logit path is what runs out first
            hf_ppl = hf_s = hf_gb = None
            oom = str(error).split(".")[0]
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        row = {"ours_needle_ppl": ours_ppl, "ours_s_per_doc": ours_s, "ours_peak_gb": ours_gb,
               "hf_needle_ppl": hf_ppl, "hf_s_per_doc": hf_s, "hf_peak_gb": hf_gb}
        if hf_ppl is None:
            row["hf_error"] = oom
            print(f"{length:>7} tokens: needle-PPL ours {ours_ppl:.4f}, {ours_s:.2f} s per doc, peak "
                  f"{ours_gb:.2f} GB | HF: {oom}", flush=True)
        else:
            row.update(ppl_rel_diff=abs(ours_ppl - hf_ppl) / hf_ppl, speedup=hf_s / ours_s, memory_ratio=hf_gb / ours_gb)
            print(f"{length:>7} tokens: needle-PPL ours {ours_ppl:.4f} vs HF {hf_ppl:.4f} | "
                  f"{ours_s:.2f} s vs {hf_s:.2f} s per doc (x{hf_s / ours_s:.2f}) | "
                  f"peak {ours_gb:.2f} GB vs {hf_gb:.2f} GB (x{hf_gb / ours_gb:.2f})", flush=True)
        results["lengths"][str(length)] = row
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
