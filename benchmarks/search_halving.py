"""Successive halving vs exhaustive scoring: the same search (same evolution seed, same needle
documents) scored both ways, for several seeds, in one run of this script.

Counted in document-forwards (``best.json['document_forwards']``: baselines, every stage of every
candidate, the held-out finalists); quality as the final best's needle-PPL on all search
documents (only fully scored candidates can be the best, so both are on the same documents) and
on the held-out documents. Goal (issue #11): >= 2x fewer document-forwards, final best within 2%. Each halving margin in
``--margins`` is one run per seed; the first document's rank correlation with the total (from
the exhaustive run) says how much a first rung can know.

    python benchmarks/search_halving.py --out results/search_halving_cpu.json

The default model is the tiny preset with random weights (std 0.3, so candidates differ): the
real scorer, the real search and the real books, seconds per search on CPU; its needle-PPL
landscape is not a trained model's. ``--checkpoint smollm2 --target-length 12288`` runs the
same comparison on SmolLM2-135M (about 90 s per 12k document-forward on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from pool_efficiency import run  # one search under torchrun -> its best.json

ROOT = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--checkpoint", help="an HF folder, .gguf or smollm2 (default: the tiny random model)")
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            source = {"checkpoint": args.checkpoint}
        else:
            model = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())
            model["init_method_std"] = 0.3
            (tmp / "model.yaml").write_text(yaml.safe_dump(model))
            source = {"model": str(tmp / "model.yaml"), "tokenizer": "hashed-words"}
        for seed in args.seeds:
            runs = {}
            for mode, rungs, margin in (("exhaustive", [], 0.0), *(("halving", args.rungs, m) for m in args.margins)):
                name = f"{mode}-{margin:g}-{seed}"
                config = tmp / f"{name}.yaml"
                config.write_text(yaml.safe_dump({
                    **source, "target_length": args.target_length, "output_dir": str(tmp / "unused"),
                    "needle": {"documents": args.documents, "heldout_documents": 2, "heldout_depths": [0.25, 0.5]},
                    "baselines": ["original", "yarn"],
                    "halving": {"rungs": rungs, "margin": margin},
                    "evolution": {"seed": seed, "population_size": args.population, "iterations": args.iterations,
                                  "parents": args.population // 2, "mutants": args.population // 4,
                                  "crossovers": args.population // 4}}))
                runs[margin if rungs else "exhaustive"] = run(config, tmp / name, 1, 29621 + len(rows) * 4 + len(runs))
            full = runs["exhaustive"]
            state = json.loads((tmp / f"exhaustive-0-{seed}" / "state.json").read_text())
            for margin in args.margins:
                half = runs[margin]
                rows.append({
                    "seed": seed, "margin": margin,
                    "forwards_exhaustive": full["document_forwards"], "forwards_halving": half["document_forwards"],
                    "forward_ratio": full["document_forwards"] / half["document_forwards"],
                    "best_exhaustive": full["needle_ppl"], "best_halving": half["needle_ppl"],
                    "best_rel_diff": half["needle_ppl"] / full["needle_ppl"] - 1,
                    "heldout_exhaustive": full["heldout"]["needle_ppl"]["longrope2"],
                    "heldout_halving": half["heldout"]["needle_ppl"]["longrope2"],
                    "stopped_early": half["stopped_early"], "candidates": half["evaluations"],
                    "first_document_rank_correlation": first_document_rank_correlation(state),
                })
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": args.checkpoint or "tiny (random weights, std 0.3)", "target_length": args.target_length,
        "documents": args.documents, "rungs": args.rungs, "population": args.population,
        "iterations": args.iterations, "seeds": rows, "by_margin": {},
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
