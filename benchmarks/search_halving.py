"""Successive halving vs exhaustive scoring: the same search (same evolution seed, same needle
documents) scored both ways, for several seeds, in one run of this script.

Counted in document-forwards (``best.json['document_forwards']``: baselines, every stage of every
candidate, the held-out finalists); quality as the final best's needle-PPL on all search
documents (only fully scored candidates can be the best, so both are on the same documents) and
on the held-out documents. Goal (issue #11): >= 2x fewer document-forwards, final best within 2%. Each halving margin in
``--margins`` is one run per seed; the first document's rank correlation with the total (from
the exhaustive run) says how much a first rung can know.

    python benchmarks/search_halving.py --out results/search_halving_cpu.json

On the miniature replication's pre-trained model (``longrope2 pipeline --config
configs/pipeline/mini_replication.yaml --only prepare``, then ``--only pretrain``), 20 min here:

    OMP_NUM_THREADS=1 python benchmarks/search_halving.py --checkpoint runs/mini_replication/pretrain/hf \
        --target-length 2048 --margins 0 0.02 0.05 --workers 2 --work runs/search_halving_mini \
        --out results/search_halving_mini_margins_cpu.json

The default model is the tiny preset with random weights (std 0.3, so candidates differ): the
real scorer, the real search and the real books, seconds per search on CPU; its needle-PPL
landscape is not a trained model's. On SmolLM2-135M at 12k (75-145 s per document-forward per
worker on 2 CPU cores) a small comparison is

    OMP_NUM_THREADS=1 python benchmarks/search_halving.py --checkpoint smollm2 --target-length 12288 \
        --seeds 0 --documents 3 --rungs 1 --margins 0.05 0.2 --population 7 --parents 4 \
        --iterations 2 --mutants 3 --crossovers 1 --heldout-documents 1 --heldout-depths 0.5 \
        --work runs/search_halving_smollm2 --out results/search_halving_smollm2_12k_cpu.json

Wall time is saved, not the counts: each halving run starts with the score logs of the runs
before it on the same seed, split per document range (an exhaustive score of documents 0-3 is
the halving stages 0-1 and 1-3), so only candidates the exhaustive run never proposed are
forwarded; ``document_forwards`` still counts every stage the halving search asked for, and
``computed_forwards`` what the run really forwarded. With ``--work`` the runs are kept and a
rerun continues them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from search_operators import computed_forwards, search, source  # one search under torchrun -> best.json


def first_document_rank_correlation(state: dict) -> float:
    """Spearman correlation, over the exhaustive run's candidates, between the answer NLL on the
    first document and on all of them: how well the first rung can rank (1 = perfectly)."""
    import numpy as np

    nll = np.array([entry["nll"] for entry in state["partial"]])
    first, total = nll[:, 0].argsort().argsort(), nll.sum(axis=1).argsort().argsort()
    return float(np.corrcoef(first, total)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evolution seeds")
    parser.add_argument("--checkpoint", default="tiny",
                        help="an HF folder, .gguf, smollm2, or tiny (the tiny preset, random weights)")
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--parents", type=int, help="default: population / 2")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--mutants", type=int, help="default: population / 4")
    parser.add_argument("--crossovers", type=int, help="default: population / 4")
    parser.add_argument("--heldout-documents", type=int, default=2)
    parser.add_argument("--heldout-depths", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work", type=Path, help="keep the runs here (a rerun continues them); default: a temporary folder")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    evolution = {"population_size": args.population, "iterations": args.iterations,
                 "parents": args.parents or args.population // 2, "mutants": args.mutants or args.population // 4,
                 "crossovers": args.crossovers or args.population // 4}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = source(args.checkpoint, work)
        for seed in args.seeds:
            runs, computed = {}, {}
            for mode, rungs, margin in (("exhaustive", [], 0.0), *(("halving", args.rungs, m) for m in args.margins)):
                name = f"{mode}-{margin:g}-{seed}"
                config = work / f"{name}.yaml"
                config.write_text(yaml.safe_dump({
                    **model, "target_length": args.target_length, "output_dir": str(work / name),
                    "needle": {"documents": args.documents, "heldout_documents": args.heldout_documents,
                               "heldout_depths": args.heldout_depths},
                    "baselines": ["original", "yarn"],
                    "halving": {"rungs": rungs, "margin": margin},
                    "evolution": {"seed": seed, **evolution}}))
                logs = sorted(p for p in work.glob(f"*-{seed}/*.worker[0-9]*.jsonl"))  # this seed's runs so far
                key = margin if rungs else "exhaustive"
                runs[key] = search(config, work / name, args.workers, 29621 + len(rows) * 4 + len(runs), logs)
                computed[key] = computed_forwards(work / name, args.heldout_documents * len(args.heldout_depths))
                print(json.dumps({"seed": seed, "run": name, "document_forwards": runs[key]["document_forwards"],
                                  "computed_forwards": computed[key], "best": runs[key]["needle_ppl"]}), flush=True)
            full = runs["exhaustive"]
            state = json.loads((work / f"exhaustive-0-{seed}" / "state.json").read_text())
            for margin in args.margins:
                half = runs[margin]
                rows.append({
                    "seed": seed, "margin": margin,
                    "forwards_exhaustive": full["document_forwards"], "forwards_halving": half["document_forwards"],
                    "forward_ratio": full["document_forwards"] / half["document_forwards"],
                    "computed_halving": computed[margin],
                    "best_exhaustive": full["needle_ppl"], "best_halving": half["needle_ppl"],
                    "best_rel_diff": half["needle_ppl"] / full["needle_ppl"] - 1,
                    "heldout_exhaustive": full["heldout"]["needle_ppl"]["longrope2"],
                    "heldout_halving": half["heldout"]["needle_ppl"]["longrope2"],
                    "stopped_early": half["stopped_early"], "candidates": half["evaluations"],
                    "first_document_rank_correlation": first_document_rank_correlation(state),
                })
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": "tiny (random weights, std 0.3)" if args.checkpoint == "tiny" else args.checkpoint,
        "target_length": args.target_length, "documents": args.documents, "rungs": args.rungs,
        "heldout_documents": args.heldout_documents, "heldout_depths": args.heldout_depths,
        **evolution, "seeds": rows, "by_margin": {},
    }
    for margin in args.margins:
        mine = [r for r in rows if r["margin"] == margin]
        ratio = sum(r["forwards_exhaustive"] for r in mine) / sum(r["forwards_halving"] for r in mine)
        worst = max(r["best_rel_diff"] for r in mine)
        result["by_margin"][str(margin)] = {"forward_ratio": ratio, "worst_best_rel_diff": worst,
                                            "goal_met": ratio >= 2 and worst <= 0.02}
    print(json.dumps(result["by_margin"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
