"""The search's operators compared on a real model: the same search (same seed, same needle
documents, same number of evaluations) run once with the earlier ``neighbour`` mutation and once
with the ``step`` mutation (bounded random steps + monotone repair), for several seeds.

Quality is the search objective itself: the final best's needle-PPL on the search documents
(in-sample, which is what an optimiser is asked to lower), and beside it the same best on a
held-out document the search never saw. Both operators start from the same initial population
(it depends only on the seed), so the generations after it are where they can differ.

Nothing is scored twice: every run starts with the score logs of the runs before it (a
candidate's key is its factors, whichever operator proposed it), so the shared initial
population and the baselines are computed once; ``computed`` counts what a run really
forwarded. The runs live under ``--work`` and a rerun of this script continues them.

    OMP_NUM_THREADS=1 python benchmarks/search_operators.py --out results/search_operators_smollm2_12k_cpu.json

75-145 s per 12k document-forward per worker on the 2-core CPU machine (it varies by day): the
default (3 seeds, population 7, 2 generations of 3 mutants + 1 crossover, 1 search document + 1
held-out) computes ~80 forwards, 50-100 min; seeds 0 and 1 took 54 min (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from longrope2.search.pool import _finite_or_none
from longrope2.search.run import _logged_scores

ROOT = Path(__file__).resolve().parents[1]
OPERATORS = ("neighbour", "step")


def every_document_range(logs: list[Path]) -> list[str]:
    """Search-score log lines rewritten for every document range their documents cover.

    A search score is one answer NLL per document of its range (``<rope>/docs<start>-<stop>``),
    each document forwarded on its own, so the NLLs of documents 0-2 scored together are those
    of 0-1 and 1-3 scored apart: an exhaustive run's log then serves a halving run's stages
    (and the other way round). Only valid between runs on the same needle documents."""
    per_document: dict[str, dict[int, float]] = {}
    for key, nll in _logged_scores(logs).items():
        rope, span = key.rsplit("/docs", 1)
        start, stop = map(int, span.split("-"))
        per_document.setdefault(rope, {}).update(zip(range(start, stop), nll))
    out = []
    for rope, nll in per_document.items():
        for start in nll:
            stop = start
            while stop in nll:
                stop += 1
                score = _finite_or_none([nll[d] for d in range(start, stop)])
                out.append(json.dumps({"tag": "earlier-runs", "key": f"{rope}/docs{start}-{stop}", "score": score}) + "\n")
    return out


def search(config: Path, out: Path, workers: int, port: int, logs: list[Path]) -> dict:
    """One search under torchrun, seeded with the score logs of earlier runs on the same needle
    documents (search scores for every document range they cover); its best.json."""
    if (out / "best.json").exists():
        return json.loads((out / "best.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    earlier = [p for p in logs if p.parent != out]
    # read on --resume as known scores, never appended to
    (out / "scores.worker-earlier-runs.jsonl").write_text(
        "".join(every_document_range([p for p in earlier if p.name.startswith("scores")])))
    (out / "heldout.worker-earlier-runs.jsonl").write_text(
        "".join(p.read_text() for p in earlier if p.name.startswith("heldout")))
    # what those scores were computed on: the search refuses to start if its own documents differ
    recorded = {(run / "scored_on.json").read_text() for run in {p.parent for p in earlier}
                if (run / "scored_on.json").exists()}
    if len(recorded) > 1:
        raise SystemExit(f"the earlier runs next to {out} were scored on different documents or models")
    if recorded and not (out / "scored_on.json").exists():
        (out / "scored_on.json").write_text(recorded.pop())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "launch" / "search.py"), "--config", str(config),
           "--output-dir", str(out), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out / "search.log", "a") as log:
        if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
            raise SystemExit(f"the search in {out} failed: see {out / 'search.log'}")
    return json.loads((out / "best.json").read_text())


def source(checkpoint: str, work: Path) -> dict:
    if checkpoint != "tiny":
        return {"checkpoint": checkpoint}
    model = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())
    model["init_method_std"] = 0.3  # random weights that still tell candidates apart
    (work / "tiny.yaml").write_text(yaml.safe_dump(model))
    return {"model": str(work / "tiny.yaml"), "tokenizer": "hashed-words"}


def computed_forwards(out: Path, heldout_documents: int) -> int:
    """Document-forwards this run computed itself (its own workers' logs): a search score's key
    ends in its document range, a held-out score covers every held-out document."""
    total = 0
    for log in out.glob("*.worker[0-9]*.jsonl"):
        for line in log.read_text().splitlines():
            key = json.loads(line)["key"]
            if log.name.startswith("heldout"):
                total += heldout_documents
            else:
                start, stop = key.rsplit("/docs", 1)[1].split("-")
                total += int(stop) - int(start)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evolution seeds")
    parser.add_argument("--checkpoint", default="smollm2",
                        help="an HF folder, .gguf, smollm2, or tiny (the tiny preset, random weights: a quick check)")
    parser.add_argument("--target-length", type=int, default=12288)
    parser.add_argument("--documents", type=int, default=1, help="search needle documents")
    parser.add_argument("--heldout-documents", type=int, default=1)
    parser.add_argument("--population", type=int, default=7)
    parser.add_argument("--parents", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--mutants", type=int, default=3)
    parser.add_argument("--crossovers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "search_operators",
                        help="the runs (a rerun continues them)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        runs = {}
        for operator in OPERATORS:
            name = f"seed{seed}-{operator}"
            config = args.work / f"{name}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump({
                **source(args.checkpoint, args.work), "target_length": args.target_length,
                "output_dir": str(args.work / name),
                "needle": {"documents": args.documents, "heldout_documents": args.heldout_documents,
                           "heldout_depths": [0.5]},
                "baselines": ["original", "yarn"],
                "evolution": {"seed": seed, "population_size": args.population, "iterations": args.iterations,
                              "parents": args.parents, "mutants": args.mutants, "crossovers": args.crossovers,
                              "operators": operator}}))
            logs = sorted(p for p in args.work.glob("seed*/*.worker[0-9]*.jsonl"))
            best = search(config, args.work / name, args.workers, 29700 + 10 * len(rows) + len(runs), logs)
            state = json.loads((args.work / name / "state.json").read_text())
            computed = computed_forwards(args.work / name, args.heldout_documents)
            runs[operator] = {
                "best": best["needle_ppl"], "heldout": best["heldout"]["needle_ppl"]["longrope2"]
                if best["heldout"] else None,
                "critical_dim": best["critical_dim"], "upper_factors": best["upper_factors"],
                "best_per_generation": state["best_per_generation"], "evaluations": best["evaluations"],
                "computed_forwards": computed, "seconds": best["seconds"],
            }
            print(json.dumps({"seed": seed, "operator": operator, **runs[operator]}), flush=True)
        step, neighbour = runs["step"], runs["neighbour"]
        assert step["evaluations"] == neighbour["evaluations"], "the two searches must make equal evaluations"
        rows.append({"seed": seed, **runs,
                     "initial_best": step["best_per_generation"][0],
                     "step_over_neighbour": step["best"] / neighbour["best"]})
    baselines = json.loads((args.work / f"seed{args.seeds[0]}-step" / "best.json").read_text())
    result = {
        "model": args.checkpoint, "target_length": args.target_length, "documents": args.documents,
        "heldout_documents": args.heldout_documents, "population": args.population, "parents": args.parents,
        "iterations": args.iterations, "mutants": args.mutants, "crossovers": args.crossovers, "seeds": rows,
        "baselines_needle_ppl": baselines["baselines_needle_ppl"],
        "baselines_heldout_needle_ppl": {k: v for k, v in ((baselines["heldout"] or {}).get("needle_ppl") or {}).items()
                                         if k != "longrope2"},
        "step_lower_in": sum(r["step"]["best"] < r["neighbour"]["best"] for r in rows),
        "equal_in": sum(r["step"]["best"] == r["neighbour"]["best"] for r in rows),
    }
    print(json.dumps({k: result[k] for k in ("step_lower_in", "equal_in")}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
