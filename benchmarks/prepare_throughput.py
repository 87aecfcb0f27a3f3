"""Tokenization throughput of ``prepare-data --config`` with 1 and with N workers on the same
input, in one run: tokens/s of the tokenizing phase (the command's own timing) and of the whole
command (start-up, planning, tokenizer loading and the merge included), the ratio, the peak
memory of the largest process, and the time the LongRoPE2 mix (10B tokens) would take on a
64-core node at the measured per-worker rate and scaling.

The input is the embedded books (``--repeat`` times) as a JSONL corpus (records of ~``--record-words`` words, like a
web corpus) tokenized with SmolLM2's real BPE tokenizer (HF tokenizers), one source, one bucket
that takes everything. 

    python benchmarks/prepare_throughput.py --workers 2 --out results/prepare_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, record_words: int, repeat: int) -> int:
    from longrope2.data.books import load_books

    records = 0
    with open(path, "w") as f:
        for book in load_books(progress=False) * repeat:
            words = book.text.split(" ")
            for start in range(0, len(words), record_words):
                f.write(json.dumps({"text": " ".join(words[start:start + record_words])}) + "\n")
                records += 1
    return records


# Runs the command and prints the largest resident set of it and its descendants (the workers):
# RUSAGE_CHILDREN's ru_maxrss covers every waited-for descendant, so a fresh parent per run.
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def prepare(config: Path, workers: int) -> tuple[float, float, dict]:
    """(seconds, peak RSS MiB of the largest process, manifest) of one prepare-data run."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "longrope2.cli", "prepare-data",
                           "--config", str(config), "--workers", str(workers)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                               "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak_mib = int(proc.stderr.strip().splitlines()[-1]) / 1024
    manifest = json.loads((Path(yaml.safe_load(config.read_text())["output"]) / "manifest.json").read_text())
    phase = re.search(r"\[prepare\] tokenized [0-9,]+ tokens of \d+ shards in ([0-9.]+) s", proc.stderr)
    manifest["tokenize_seconds"] = float(phase.group(1))
    return seconds, peak_mib, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--record-words", type=int, default=2000)
    parser.add_argument("--records-per-shard", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=4, help="the books this many times (amortizes start-up)")
    parser.add_argument("--trials", type=int, default=2, help="alternating runs per worker count; the best counts")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = write_corpus(tmp / "corpus.jsonl", args.record_words, args.repeat)
        runs = {}
        # alternating trials, the best of each: the first run of a config also warms caches
        for trial in range(args.trials):
            for workers in (1, args.workers):
                config = tmp / f"mix{workers}-{trial}.yaml"
                config.write_text(yaml.safe_dump({
                    "output": str(tmp / f"out{workers}-{trial}"), "tokenizer": args.tokenizer, "window": 8192,
                    "records_per_shard": args.records_per_shard,
                    "buckets": {"all": {"min_tokens": 1, "max_tokens": 10**9}},
                    "sources": [{"name": "books", "paths": [str(tmp / "corpus.jsonl")], "budgets": {"all": None}}]}))
                seconds, peak_mib, manifest = prepare(config, workers)
                run = {"seconds": seconds, "tokenize_seconds": manifest["tokenize_seconds"],
                       "tokens": manifest["tokenized_tokens"],
                       "tokens_per_s": manifest["tokenized_tokens"] / manifest["tokenize_seconds"],
                       "tokens_per_s_whole_command": manifest["tokenized_tokens"] / seconds,
                       "peak_rss_mib_largest_process": peak_mib}
                print(json.dumps({"workers": workers, "trial": trial, **run}), flush=True)
                if workers not in runs or run["tokenize_seconds"] < runs[workers]["tokenize_seconds"]:
                    runs[workers] = run
        same = (tmp / "out1-0" / "all.bin").read_bytes() == (tmp / f"out{args.workers}-0" / "all.bin").read_bytes()
    one, many = runs[1], runs[args.workers]
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    efficiency = ratio / args.workers
    mix_tokens = 10e9
    node_rate = one["tokens_per_s"] * 64 * min(efficiency, 1.0)
    result = {
        "tokenizer": args.tokenizer, "repeat": args.repeat, "records": records, "tokens": one["tokens"], "cpu_cores": os.cpu_count(),
        "runs": {str(k): v for k, v in runs.items()}, "ratio": ratio, "efficiency": efficiency,
        "identical_output": same,
        "projected_10B_tokens_on_64_cores_hours": mix_tokens / node_rate / 3600,
        "projection": "10B tokens / (64 x the 1-worker tokenizing rate x the measured efficiency, at most 1); "
                      "assumes that efficiency holds at 64 workers and reading keeps up",
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
