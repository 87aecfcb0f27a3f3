"""Parallel efficiency of the search's worker pool: the same search with 1 and with N workers
(data-parallel ranks under torchrun), in one run of this script.

Scoring time only (model loading and imports excluded: ``best.json['seconds']``); the results
must be identical, and efficiency = (rate_N / rate_1) / N.

    python benchmarks/pool_efficiency.py --workers 2            # CPU: tiny model, 4k needles
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, out: Path, nproc: int, port: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "launch" / "search.py"), "--config", str(config), "--output-dir", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads((out / "best.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target-length", type=int, default=4096)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())
        model["init_method_std"] = 0.3
        (tmp / "model.yaml").write_text(yaml.safe_dump(model))
        config = tmp / "search.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(tmp / "model.yaml"), "tokenizer": "hashed-words", "target_length": args.target_length,
            "output_dir": str(tmp / "unused"), "needle": {"documents": 2},
            "evolution": {"population_size": args.population, "iterations": 2, "parents": args.population // 2,
                          "mutants": args.population // 4, "crossovers": args.population // 4}}))
        one = run(config, tmp / "one", 1, 29611)
        many = run(config, tmp / "many", args.workers, 29613)
    evaluations = one["evaluations"] + len(one["baselines_needle_ppl"])
    rate_one, rate_many = evaluations / one["seconds"], evaluations / many["seconds"]
    result = {
        "workers": args.workers, "evaluations": evaluations, "target_length": args.target_length,
        "seconds_1": one["seconds"], f"seconds_{args.workers}": many["seconds"],
        "speedup": rate_many / rate_one, "efficiency": rate_many / rate_one / args.workers,
        "identical_result": one["long_factor"] == many["long_factor"] and one["needle_ppl"] == many["needle_ppl"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
