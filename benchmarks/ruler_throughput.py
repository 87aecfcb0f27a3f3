"""RULER samples/s on SmolLM2-135M, one prompt per forward (``greedy_generate``, the eval's path
before batching) vs several per forward (``greedy_generate_batch``: left padding, an attention
mask, the LM head only at the last position), at each length, in one run.

Both paths decode the same prompts (our ``niah_single_2``, original RoPE) for exactly
``--max-new-tokens`` steps (no early stop), so the ratio is the batching's alone; the generated
tokens are compared row by row.

    OMP_NUM_THREADS=1 python benchmarks/ruler_throughput.py --lengths 4096,16384 --samples 4,2 \\
        --modes "single,padded,equal;single,equal" --output results/ruler_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--samples", default="4,2", help="prompts per length (= the batch size)")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--modes", default="single,padded,equal",
                        help="single: one prompt per forward; padded: the prompts left-padded into one batch "
                             "(masked attention); equal: the prompts cut to the shortest one's last tokens, one "
                             "batch without a mask (what batching costs when lengths match); per length: a;b")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [int(n) for n in args.lengths.split(",")]
    counts = [int(n) for n in args.samples.split(",")]
    if len(counts) != len(lengths):
        raise SystemExit("error: --samples needs one count per length")

    from longrope2.data import tokenize
    from longrope2.data.books import load_books
    from longrope2.eval.generate import greedy_generate, greedy_generate_batch
    from longrope2.eval.model import RopeSwitch, load_model, resolve_rope
    from longrope2.eval.ruler import to_sample
    from longrope2.eval.ruler_gen import RulerGenerator

    model, hf_tokenizer = load_model("smollm2")
    switch = RopeSwitch(model)
    switch.apply(resolve_rope("original", switch.geometry, None))
    wrapped = tokenize.from_hf(hf_tokenizer, "smollm2")
    generator = RulerGenerator(lambda t: len(wrapped.encode(t)), [(b.title, b.text) for b in load_books()])
    modes = [m.split(",") for m in args.modes.split(";")]
    modes = modes * len(lengths) if len(modes) == 1 else modes
    rows = []
    for length, n, wanted in zip(lengths, counts, modes):
        prompts = [to_sample(generator.record(args.task, length, i), args.task, length, i, wrapped.encode,
                             wrapped.bos_token_id).prompt for i in range(n)]
        shortest = min(len(p) for p in prompts)
        row = {"length": length, "samples": n, "prompt_tokens": [len(p) for p in prompts]}
        for mode in wanted:
            batch = prompts if mode != "equal" else [p[-shortest:] for p in prompts]
            t0 = time.perf_counter()
            if mode == "single":
                tokens = [greedy_generate(model, torch.tensor(p), args.max_new_tokens).new_tokens for p in batch]
            else:
                tokens = [g.new_tokens for g in greedy_generate_batch(model, batch, args.max_new_tokens,
                                                                      pad_token_id=hf_tokenizer.eos_token_id)]
            seconds = time.perf_counter() - t0
            row[mode] = {"seconds": round(seconds, 1), "samples_per_s": round(n / seconds, 4)}
            if mode == "single":
                single_tokens = tokens
            elif mode == "padded" and "single" in wanted:
                row[mode]["same_tokens_as_single"] = tokens == single_tokens
            print(json.dumps({"length": length, "mode": mode, **row[mode]}), flush=True)
        for mode in ("padded", "equal"):
            if mode in row and "single" in row:
                row[mode]["speedup_vs_single"] = round(row["single"]["seconds"] / row[mode]["seconds"], 3)
        rows.append(row)
    result = {"device": f"CPU ({platform.processor() or platform.machine()}), torch threads 1",
              "torch": torch.__version__, "task": args.task, "max_new_tokens": args.max_new_tokens, "rows": rows}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
