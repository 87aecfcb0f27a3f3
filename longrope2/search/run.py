"""The needle-driven LongRoPE2 search end to end: config, model, documents, pool, outputs.

Run by ``torchrun launch/search.py --config ...`` (or ``longrope2 search``). Every rank runs the
same deterministic algorithm; the pool shares the scoring; rank 0 writes the files:

    state.json            everything needed to resume, rewritten atomically every generation
    scores.worker*.jsonl  every score as it is computed (a killed generation is not re-scored)
    scored_on.json        what the logged scores depend on (model, dtype, documents); --resume checks it
    best.json             best factors, critical dim and needle-PPL
    rope_config.json      HF ``longrope`` fields for config.json (transformers >= 5 style)
    rope_config.rope_scaling.json   the same in the legacy ``rope_scaling`` style (4.x, vLLM)
    history.csv           every scored candidate
    comparison.md         needle-PPL of the searched factors vs original RoPE, PI, NTK, YaRN
    search.png            best needle-PPL per generation and the factor curves
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longrope2 import configs
from longrope2.search.evolution import EvolutionConfig
from longrope2.search.halving import HalvingConfig


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1


@dataclass(kw_only=True)
class NeedleConfig:
    documents: int = 4
    """Needle documents per depth (paper: 10 PG19 books)."""
    depths: list[float] = field(default_factory=lambda: [0.0])
    """Needle depths in the haystack; 0 = right after the instruction (the paper's choice)."""
    seed: int = 0
    books: list[str] | None = None
    """Text files or folders (e.g. PG19 validation); None = the embedded public-domain books."""
    heldout_documents: int = 2
    """Needle documents per held-out depth that the search never sees (0: none): the next books
    after the search's, another seed, other depths. The best candidate and every baseline are
    scored on them once the search ends; reports lead with these numbers."""
    heldout_depths: list[float] = field(default_factory=lambda: [0.25, 0.5])
    heldout_seed: int = 1

    def __post_init__(self) -> None:
        if self.documents < 1 or self.heldout_documents < 0:
            raise ValueError(f"needle.documents must be >= 1 and heldout_documents >= 0, got {self.documents}, "
                             f"{self.heldout_documents}")
        for depth in (*self.depths, *self.heldout_depths):
            if not 0 <= depth <= 1:
                raise ValueError(f"needle depths must be in [0, 1], got {depth}")
        if self.heldout_documents and self.heldout_seed == self.seed:
            raise ValueError(f"needle.heldout_seed must differ from needle.seed ({self.seed}): held-out documents "
                             "are drawn with their own seed")


@dataclass(kw_only=True)
class SearchConfig:
    target_length: int
    """Length of the needle documents and of the extended window."""
    output_dir: str
    checkpoint: str | None = None
    """HF model folder, .gguf file, or ``smollm2`` (the embedded SmolLM2-135M); None = random
    weights for the ``model`` preset (tests, benchmarks)."""
    model: str | None = None
    """Model preset or YAML, used when ``checkpoint`` is None."""
    tokenizer: str | None = None
    """None = the checkpoint's; ``hashed-words`` for random-weight models."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    halving: HalvingConfig = field(default_factory=HalvingConfig)
    """Successive halving over the search documents (``search.halving``); off by default."""
    min_critical_dim: int | None = None
    """Lowest candidate real critical dim; None = the ten-period dim d10."""
    max_critical_dim: int | None = None
    """Highest candidate; None = the theoretical critical dim d_tcd."""
    grid: float = 0.01
    baselines: list[str] = field(default_factory=lambda: ["original", "pi", "ntk", "yarn"])
    """Scored in the same run for the comparison table; also ``file:PATH`` (a JSON factor list)."""
    dtype: str = "float32"
    seed: int = 1234
    worker_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("give exactly one of `checkpoint` (HF weights) and `model` (random weights)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        self.halving.check(self.needle.documents * len(self.needle.depths))
        for name in self.baselines:
            if name not in ("original", "pi", "ntk", "yarn") and not name.startswith("file:"):
                raise ValueError(f"unknown baseline {name!r}: use original, pi, ntk, yarn or file:PATH")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "SearchConfig":
        return configs.load_yaml(cls, path, overrides=overrides, what="search config")


def scaling_key(scaling) -> str:
    """Identity of a rope candidate for the score cache."""
    if scaling is None:
        return "original"
    payload = json.dumps([[round(x, 9) for x in scaling.long_factor], round(scaling.resolved_attention_factor, 9)])
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def scored_on(config: SearchConfig, model_cfg, documents, heldout_documents) -> dict[str, str]:
    """What a logged score depends on besides its rope: the model, the dtype and the needle
    documents (tokens and answer positions, so the tokenizer, books, seeds, depths and length).
    Score keys name only the rope and the document range, so scores are reused only where this
    matches."""
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]

    weights = str(config.checkpoint) if config.checkpoint is not None else f"random, seed {config.seed}"
    return {"weights": weights, "model_config": digest(repr(model_cfg)), "dtype": config.dtype,
            "documents": digest([[d.tokens, d.answer_start] for d in documents]),
            "heldout_documents": digest([[d.tokens, d.answer_start] for d in heldout_documents])}


def check_scored_on(path: Path, current: dict[str, str]) -> None:
    """The scores logged in ``path``'s folder were computed on what ``current`` names (or none
    are recorded yet); else a --resume would mix in scores of another model or other documents."""
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = [k for k in current if recorded.get(k) != current[k]]
        if changed:
            raise ValueError(f"{path.parent} holds scores computed with other {', '.join(changed).replace('_', ' ')} "
                             f"(see {path.name}); --resume would reuse them as this config's: choose another output_dir")
    _atomic_write(path, json.dumps(current, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _broadcast_object(obj):
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def load_model_and_tokenizer(config: SearchConfig):
    """This rank's megatron model (weights loaded) with the dual-cache rotary, its ModelConfig,
    and the tokenizer."""
    from longrope2.data import tokenize
    from longrope2.model.config import ModelConfig
    from longrope2.model.gpt import build_gpt_model
    from longrope2.parallel import default_device

    dtype = getattr(torch, config.dtype)
    if config.checkpoint is not None:
        from longrope2.model.hf_convert import load_hf_into_megatron
        from longrope2.model.pretrained import load_hf_causal_lm

        hf, hf_tokenizer = load_hf_causal_lm(config.checkpoint)
        model_cfg = ModelConfig.from_hf_config(hf.config, name=str(config.checkpoint))
        model = build_gpt_model(model_cfg, params_dtype=dtype)
        load_hf_into_megatron(model, {k: v.to(dtype) for k, v in hf.state_dict().items()}, model_cfg)
        del hf
        tokenizer = tokenize.from_hf(hf_tokenizer, str(config.checkpoint))
    else:
        path = Path(config.model)
        model_cfg = ModelConfig.from_yaml(path) if path.suffix in (".yaml", ".yml") else ModelConfig.from_name(config.model)
        torch.manual_seed(config.seed)
        model = build_gpt_model(model_cfg, params_dtype=dtype)
        tokenizer = None
    if config.tokenizer == "hashed-words" or tokenizer is None:
        if config.tokenizer not in (None, "hashed-words"):
            raise ValueError(f"tokenizer {config.tokenizer!r}: only the checkpoint's or `hashed-words` is supported")
        tokenizer = tokenize.hashed_words(model_cfg.vocab_size)
    return model.to(default_device()).eval(), model_cfg, tokenizer


def needle_documents(config: SearchConfig, tokenizer, heldout: bool = False):
    """The search's needle documents, or (``heldout``) the held-out ones: the books after the
    search's (cycling), ``heldout_seed``, ``heldout_depths``."""
    from longrope2.data.books import load_books, load_text_files
    from longrope2.data.needle import make_needle_documents

    needle = config.needle
    books = load_text_files(needle.books) if needle.books else load_books(progress=False)
    pairs = [(book.title, book.text) for book in books]
    if heldout:
        shift = needle.documents % len(pairs)
        pairs = pairs[shift:] + pairs[:shift]
    count, seed, depths = ((needle.heldout_documents, needle.heldout_seed, needle.heldout_depths) if heldout
                           else (needle.documents, needle.seed, needle.depths))
    # one extra token: the inputs of a document are then exactly target_length long
    return make_needle_documents(tokenizer.encode, pairs, config.target_length + 1, count, seed=seed,
                                 depths=depths, bos_token_id=tokenizer.bos_token_id)


def baseline_scalings(config: SearchConfig, model_cfg) -> dict[str, Any]:
    from longrope2.rope.scaling import RopeScaling

    out: dict[str, Any] = {}
    for name in config.baselines:
        if name == "original":
            out[name] = None
        elif name.startswith("file:"):  # best.json, an HF config / rope_config.json, or a factor list
            path = Path(name[5:])
            out[path.stem] = RopeScaling.from_file(path, model_cfg.rope_geometry, target_length=config.target_length)
        else:
            out[name] = RopeScaling.from_method(name, model_cfg.rope_geometry, config.target_length)
    return out


def run_search(config: SearchConfig, resume: bool = False) -> dict[str, Any] | None:
    """The search under torchrun (or one process). Returns the best result on rank 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from tqdm import tqdm

    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel
    from longrope2.rope import ten_period_dim, theoretical_critical_dim
    from longrope2.rope.scaling import RopeScaling
    from longrope2.search import evolution as evo
    from longrope2.search import halving
    from longrope2.search.pool import CandidatePool
    from longrope2.search.scorer import NeedleScorer

    out_dir = Path(config.output_dir)
    state_path = out_dir / "state.json"
    dims = initialize_parallel(ParallelDims(tp=config.parallel.tp, pp=config.parallel.pp, cp=config.parallel.cp),
                               seed=config.seed)
    rank = dist.get_rank()
    try:
        if rank == 0:
            if state_path.exists() and not resume:
                raise FileExistsError(f"{state_path} exists: pass --resume to continue it, or choose another output_dir")
            if resume and not state_path.exists():  # stopped inside its first generation
                print(f"[search] --resume: no {state_path} yet; starting from the first generation, "
                      "reusing the scores already logged", flush=True)
        dist.barrier()

        model, model_cfg, tokenizer = load_model_and_tokenizer(config)
        dims.validate(model=model_cfg, seq_len=config.target_length)
        geometry = model_cfg.rope_geometry
        tcd = theoretical_critical_dim(geometry.rotary_dim, geometry.rope_theta, geometry.original_max_position_embeddings)
        d10 = ten_period_dim(geometry.rotary_dim, geometry.rope_theta, geometry.original_max_position_embeddings)
        space = evo.SearchSpace(dim=geometry.rotary_dim, base=geometry.rope_theta,
                                original_length=geometry.original_max_position_embeddings,
                                target_length=config.target_length,
                                min_critical_dim=config.min_critical_dim or d10,
                                max_critical_dim=config.max_critical_dim or tcd, grid=config.grid)
        space.check_population(config.evolution.population_size)
        if rank == 0:  # only once the model, the layout and the search space are known good
            out_dir.mkdir(parents=True, exist_ok=True)
        if config.needle.books is None:  # rank 0 fetches the embedded books once; the rest read the cache
            if rank == 0:
                from longrope2.data.books import load_books

                load_books(progress=False)
            dist.barrier()
        documents = needle_documents(config, tokenizer)
        heldout_documents = needle_documents(config, tokenizer, heldout=True) if config.needle.heldout_documents else []
        scorer = NeedleScorer(model, documents)
        if rank == 0:
            check_scored_on(out_dir / "scored_on.json", scored_on(config, model_cfg, documents, heldout_documents))

        # state and every score already computed (rank 0 reads, everyone gets the same)
        state, known, known_heldout = evo.SearchState(), {}, {}
        if resume and rank == 0:
            if state_path.exists():
                state = evo.SearchState.from_dict(json.loads(state_path.read_text()))
            known = _logged_scores(out_dir.glob("scores.worker*.jsonl"))
            known_heldout = _logged_scores(out_dir.glob("heldout.worker*.jsonl"))
        state, known, known_heldout = _broadcast_object((state, known, known_heldout))

        worker = parallel_state.get_data_parallel_rank()
        # a pool task is (rope, first document, stop document); its score, the documents' answer NLLs
        pool = CandidatePool(lambda task: scorer.score_documents(*task), out_dir / f"scores.worker{worker}.jsonl",
                             config.worker_timeout_s)
        counts, num_documents = scorer.answer_counts, len(documents)
        every_document = f"docs0-{num_documents}"
        baselines = baseline_scalings(config, model_cfg)
        base_keys = [f"{scaling_key(s)}/{every_document}" for s in baselines.values()]
        total = len(baselines) + config.evolution.population_size + config.evolution.iterations * (
            config.evolution.mutants + config.evolution.crossovers)
        bar = tqdm(total=total, desc="needle-PPL evaluations", disable=rank != 0, dynamic_ncols=True)
        bar.update(sum(k in known for k in base_keys) + len(state.scored_in))
        started = time.time()

        base_nll = pool.score("baselines", [(s, 0, num_documents) for s in baselines.values()], base_keys, known)
        bar.update(sum(k not in known for k in base_keys))
        baseline_results = {name: halving.needle_ppl(nll, counts) for name, nll in zip(baselines, base_nll)}
        known.update(zip(base_keys, base_nll))  # a candidate equal to a baseline is not scored again
        if rank == 0:
            bar.write("baselines: " + ", ".join(f"{k} {v:.4g}" for k, v in baseline_results.items()))

        while state.generation <= config.evolution.iterations:
            candidates = evo.propose(state, space, config.evolution)
            scalings = {c: RopeScaling.from_factors(geometry, config.target_length, c.factors(space)) for c in candidates}
            generation = state.generation

            def score_stage(alive, start, stop):  # one pool task per candidate and document range
                return pool.score(f"gen{generation}/docs{start}-{stop}", [(scalings[c], start, stop) for c in alive],
                                  [f"{scaling_key(scalings[c])}/docs{start}-{stop}" for c in alive], known)

            nll = halving.score_generation(candidates, state.population, state.partial, num_documents, counts,
                                           config.halving, config.evolution.parents, score_stage)
            full = {c: halving.needle_ppl(v, counts) for c, v in nll.items() if len(v) == num_documents}
            evo.advance(state, full, config.evolution, partial=nll)
            bar.update(len(candidates))
            if rank == 0:
                _atomic_write(state_path, json.dumps(state.to_dict()))
                champion, value = evo.best(state)
                bar.set_postfix(best=f"{value:.4g}", d_rcd=champion.critical_dim, gen=state.generation - 1,
                                forwards=document_forwards(state, len(baselines), num_documents))
        bar.close()

        heldout_results = None
        if config.needle.heldout_documents:
            champion, _ = evo.best(state)
            finalists = {"longrope2": RopeScaling.from_factors(geometry, config.target_length,
                                                               champion.factors(space)), **baselines}
            heldout_scorer = NeedleScorer(model, heldout_documents)
            heldout_pool = CandidatePool(heldout_scorer.score, out_dir / f"heldout.worker{worker}.jsonl",
                                         config.worker_timeout_s)
            scores = heldout_pool.score("heldout", list(finalists.values()),
                                        [scaling_key(s) for s in finalists.values()], known_heldout)
            heldout_results = dict(zip(finalists, scores))
            if rank == 0:
                print("held-out needle-PPL: " + ", ".join(f"{k} {v:.4g}" for k, v in heldout_results.items()),
                      flush=True)

        if rank != 0:
            return None
        result = write_outputs(config, out_dir, state, space, geometry, baseline_results, baselines,
                               tcd, d10, elapsed=time.time() - started, scored_here=pool.scored_here,
                               answer_counts=counts, heldout_results=heldout_results)
        return result
    finally:
        destroy_parallel()


def document_forwards(state, baselines: int, documents: int) -> int:
    """Document-forwards of the search so far (baselines on every document, each candidate on
    the documents it reached), whether computed in this launch or read back on resume."""
    return baselines * documents + sum(len(nll) for nll in state.partial.values())


def _logged_scores(logs) -> dict[str, float]:
    known = {}
    for log in sorted(logs):
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # empty, or cut by a kill: scored again
                continue
            known[entry["key"]] = _from_log(entry["score"])
    return known


def _from_log(score):
    """A logged score back: null (a non-finite score) -> inf, per-document lists element-wise."""
    if isinstance(score, list):
        return [_from_log(x) for x in score]
    return math.inf if score is None else score


def write_outputs(config, out_dir: Path, state, space, geometry, baseline_results, baselines, tcd, d10,
                  elapsed: float, scored_here: int, answer_counts: list[int],
                  heldout_results: dict[str, float] | None = None) -> dict[str, Any]:
    from longrope2.rope.scaling import RopeScaling
    from longrope2.search import evolution as evo
    from longrope2.search.halving import needle_ppl

    champion, value = evo.best(state)
    scaling = RopeScaling.from_factors(geometry, config.target_length, champion.factors(space))
    search_docs = config.needle.documents * len(config.needle.depths)
    heldout_docs = config.needle.heldout_documents * len(config.needle.heldout_depths)
    result = {
        "target_length": config.target_length,
        "original_length": geometry.original_max_position_embeddings,
        "critical_dim": champion.critical_dim,
        "theoretical_critical_dim": tcd,
        "ten_period_dim": d10,
        "upper_factors": [round(u * space.grid, 10) for u in champion.upper],
        "long_factor": list(scaling.long_factor),
        "attention_factor": scaling.resolved_attention_factor,
        "heldout": None if heldout_results is None else {
            "needle_ppl": heldout_results,
            "documents": heldout_docs,
            "depths": config.needle.heldout_depths,
            "seed": config.needle.heldout_seed,
        },
        "needle_ppl": value,  # in-sample: the best candidate on the documents it was selected on
        "baselines_needle_ppl": baseline_results,
        "evaluations": len(state.scored_in),
        "stopped_early": len(state.scored_in) - len(state.scores),
        "document_forwards": document_forwards(state, len(baselines), search_docs) + (
            0 if heldout_results is None else len(heldout_results) * heldout_docs),
        "generations": state.generation,
        "seconds": elapsed,
    }
    _atomic_write(out_dir / "best.json", json.dumps(result, indent=1))
    fixed = RopeScaling.from_factors(geometry, config.target_length, list(scaling.long_factor),
                                     attention_factor=scaling.resolved_attention_factor)
    _atomic_write(out_dir / "rope_config.json", json.dumps(fixed.to_hf_config("rope_parameters"), indent=1))
    _atomic_write(out_dir / "rope_config.rope_scaling.json", json.dumps(fixed.to_hf_config("rope_scaling"), indent=1))
    with open(out_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["generation", "critical_dim", "needle_ppl", "documents", "upper_factors"])
        for cand, generation in state.scored_in.items():
            if cand in state.scores:
                score, reached = state.scores[cand], search_docs
            else:  # stopped at a rung: its needle-PPL on the documents it reached
                nll = state.partial[cand]
                score, reached = needle_ppl(nll, answer_counts), len(nll)
            writer.writerow([generation, cand.critical_dim, score, reached,
                             " ".join(f"{u * space.grid:.2f}" for u in cand.upper)])
    searched = f"LongRoPE2 (searched, d_rcd = {champion.critical_dim})"
    if heldout_results is not None:
        held = result["heldout"]
        rows = [f"| {name} | {heldout_results[name]:.4f} | {ppl:.4f} |" for name, ppl in baseline_results.items()]
        rows.append(f"| **{searched}** | **{heldout_results['longrope2']:.4f}** | {value:.4f} (in-sample) |")
        header = [f"| rope | held-out needle-PPL ({held['documents']} documents, depths "
                  f"{', '.join(f'{d:g}' for d in held['depths'])}) | search needle-PPL ({search_docs} documents) |",
                  "| --- | --- | --- |"]
        note = ("Held-out: other books, another seed and other needle depths than the search's; the searched "
                "column is the minimum over all candidates on the documents they were selected on.")
    else:
        rows = [f"| {name} | {ppl:.4f} |" for name, ppl in baseline_results.items()]
        rows.append(f"| **{searched}** | **{value:.4f}** (in-sample) |")
        header = [f"| rope | search needle-PPL ({search_docs} documents) |", "| --- | --- |"]
        note = "No held-out documents (needle.heldout_documents: 0): the searched value is in-sample."
    table = "\n".join([
        f"# LongRoPE2 search: {config.target_length} tokens (original window {geometry.original_max_position_embeddings})",
        "",
        f"{len(config.baselines)} baselines and {len(state.scored_in)} candidates over {state.generation} generations "
        f"on {search_docs} needle documents, {elapsed / 60:.1f} min; {result['document_forwards']:,} "
        f"document-forwards" + (f" ({result['stopped_early']} candidates stopped early by successive halving, "
                                f"rungs {config.halving.rungs}, margin {config.halving.margin:g})"
                                if config.halving.rungs else "") + ".",
        "",
        *header,
        *rows,
        "",
        note,
        "",
        f"Critical dims: found d_rcd = {champion.critical_dim}; theoretical d_tcd = {tcd}; ten-period d10 = {d10}.",
    ])
    _atomic_write(out_dir / "comparison.md", table + "\n")
    plot_search(out_dir / "search.png", state, scaling, baselines, baseline_results, champion.critical_dim, tcd)
    return result


def plot_search(path: Path, state, scaling, baselines, baseline_results, critical_dim: int, tcd: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    generations = list(range(len(state.best_per_generation)))
    left.plot(generations, state.best_per_generation, "k.-", label="LongRoPE2 search (best so far)")
    for i, (name, ppl) in enumerate(baseline_results.items()):
        if math.isfinite(ppl):
            left.axhline(ppl, ls="--", color=f"C{i}", label=f"{name} {ppl:.3g}")
    left.set_yscale("log")
    left.set_xlabel("generation (0 = initial population)")
    left.set_ylabel("needle-driven PPL (answer tokens)")
    left.legend(fontsize=8)
    pairs = range(len(scaling.long_factor))
    right.semilogy(pairs, scaling.long_factor, "k.-", label=f"LongRoPE2, d_rcd = {critical_dim}")
    for i, (name, other) in enumerate(baselines.items()):
        if other is not None:
            right.semilogy(pairs, other.long_factor, ".-", color=f"C{i}", alpha=0.7, label=name)
    right.axvline(tcd, color="tab:red", ls=":", label=f"d_tcd = {tcd}")
    right.axvline(critical_dim, color="k", ls=":")
    right.set_xlabel("RoPE pair i")
    right.set_ylabel("rescale factor")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

