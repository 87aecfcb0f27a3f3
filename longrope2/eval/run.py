"""``longrope2 eval``: every task x length x rope cell on one loaded model, resumable.

Files in ``output_dir``:

    meta.json       what was evaluated (model, tokenizer, seed, books); a rerun must match it
    results.jsonl   one line per sample as soon as it is computed -- a rerun skips those
    summary.json    aggregated metrics, rewritten after every (length, task) group
    report.md       the tables of summary.json
    scores.png      each metric vs length, one line per rope config
    needle_heatmap.png   needle-in-a-haystack accuracy, depth x length, one panel per rope

Cells run length by length (shortest first), each length for every rope, so an interrupted eval
already compares the ropes on the lengths it finished.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from longrope2.eval.config import EvalConfig
from longrope2.eval.model import Rope, RopeSwitch, load_model, resolve_rope
from longrope2.eval.tasks import RULER_TASKS, Corpus, TaskBuilder, sample_rng

PPL_TASKS = ("needle_ppl", "book_ppl", "short_ppl")
TASK_ORDER = ("needle_ppl", "passkey", "book_ppl", "short_ppl", "needle", *RULER_TASKS)
TASK_TITLES = {
    "needle_ppl": "Needle-driven PPL (answer tokens; lower is better)",
    "book_ppl": "Book PPL (last tokens of each window; lower is better)",
    "short_ppl": "Short-context book PPL (retention; lower is better)",
    "passkey": "Passkey retrieval accuracy (%, exact match)",
    "needle": "Needle-in-a-haystack accuracy (%, exact match, mean over depths)",
}


@dataclass
class EvalTokenizer:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str] | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    name: str


def eval_tokenizer(hf_tokenizer, config: EvalConfig, vocab_size: int) -> EvalTokenizer:
    from longrope2.data import tokenize

    if config.tokenizer == "hashed-words" or hf_tokenizer is None:
        if config.tokenizer != "hashed-words":
            raise ValueError(f"{config.model} has no tokenizer; set `tokenizer: hashed-words` (PPL tasks only)")
        hashed = tokenize.hashed_words(vocab_size)
        return EvalTokenizer(hashed.encode, None, None, None, hashed.name)
    wrapped = tokenize.from_hf(hf_tokenizer, config.model)
    return EvalTokenizer(wrapped.encode, lambda ids: hf_tokenizer.decode(ids, skip_special_tokens=True),
                         wrapped.bos_token_id, hf_tokenizer.eos_token_id, type(hf_tokenizer).__name__)


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    index: int
    depth: float | None = None

    def key(self, rope: Rope) -> str:
        depth = "" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}|{rope.fingerprint}|{self.length}|{depth}|{self.index}"


class ResultStore:
    """results.jsonl: appended and flushed per sample; read back on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash: recompute that cell
                        continue
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan(config: EvalConfig) -> list[tuple[int, str, list[Cell]]]:
    """``(length, task, cells)`` groups: shortest length first (``order: length``), or task by task
    (``order: task``: needle PPL at every length, then passkey, ...)."""
    groups: dict[tuple[int, str], list[Cell]] = defaultdict(list)

    def lengths(task_lengths):
        return task_lengths if task_lengths is not None else config.lengths

    if config.needle_ppl.samples:
        for n in lengths(config.needle_ppl.lengths):
            groups[n, "needle_ppl"] += [Cell("needle_ppl", n, i, config.needle_ppl.depth)
                                        for i in range(config.needle_ppl.samples)]
    if config.book_ppl.samples:
        for n in lengths(config.book_ppl.lengths):
            groups[n, "book_ppl"] += [Cell("book_ppl", n, i) for i in range(config.book_ppl.samples)]
    if config.short_context.samples:
        for n in config.short_context.lengths:
            groups[n, "short_ppl"] += [Cell("short_ppl", n, i) for i in range(config.short_context.samples)]
    for task in ("passkey", "needle"):
        section = getattr(config, task)
        if section.samples:
            for n in lengths(section.lengths):
                for depth in section.depths or [None]:
                    groups[n, task] += [Cell(task, n, i, depth) for i in range(section.samples)]
    if config.ruler.samples:
        for n in lengths(config.ruler.lengths):
            for task in config.ruler.tasks:
                groups[n, task] += [Cell(task, n, i) for i in range(config.ruler.samples)]
    if config.order == "task":
        rank = {t: i for i, t in enumerate(TASK_ORDER)}
        return [(n, t, cells) for (n, t), cells in sorted(groups.items(), key=lambda kv: (rank[kv[0][1]], kv[0][0]))]
    return [(n, task, cells) for (n, task), cells in sorted(groups.items(), key=lambda kv: kv[0][0])]


class Evaluator:
    """Computes single cells; samples are rebuilt from the seed whenever needed."""

    def __init__(self, config: EvalConfig, model, tokenizer: EvalTokenizer, books: list[tuple[str, str]]):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.books = books
        self.corpus = Corpus(tokenizer.encode, books, tokenizer.bos_token_id)
        new_tokens = {**config.ruler.max_new_tokens}
        for task in ("passkey", "needle"):
            if getattr(config, task).max_new_tokens is not None:
                new_tokens[task] = getattr(config, task).max_new_tokens
        self.builder = TaskBuilder(self.corpus, config.seed, new_tokens)
        self._needle_docs: dict[int, list] = {}

    def needle_document(self, cell: Cell):
        from longrope2.data.needle import make_needle_documents

        docs = self._needle_docs.get(cell.length, [])
        if len(docs) <= cell.index:  # documents are a prefix-stable sequence: build up to this one
            seed = int(sample_rng(self.config.seed, "needle_ppl", cell.length, 0).integers(2**31))
            docs = make_needle_documents(self.tokenizer.encode, self.books, cell.length + 1, cell.index + 1, seed=seed,
                                         depths=[cell.depth or 0.0], bos_token_id=self.tokenizer.bos_token_id)
            self._needle_docs[cell.length] = docs
        return docs[cell.index]

    def book_window(self, cell: Cell) -> list[int]:
        rng = sample_rng(self.config.seed, "book_ppl", cell.length, cell.index)
        bos = self.tokenizer.bos_token_id
        head = [bos] if bos is not None else []
        return head + self.corpus.text_tokens(cell.length - len(head), rng, book=cell.index % len(self.books))

    def compute(self, cell: Cell) -> dict[str, Any]:
        from longrope2.eval import ppl

        if cell.task == "needle_ppl":
            nll, count = ppl.needle_nll(self.model, self.needle_document(cell))
            return {"nll": nll, "count": count}
        if cell.task in ("book_ppl", "short_ppl"):
            last = self.config.book_ppl.last_tokens if cell.task == "book_ppl" else self.config.short_context.last_tokens
            nll, count = ppl.book_window_nll(self.model, self.book_window(cell), min(last, cell.length // 2))
            return {"nll": nll, "count": count}
        return self.generate(cell)

    def generate(self, cell: Cell) -> dict[str, Any]:
        from longrope2.eval.generate import greedy_generate
        from longrope2.eval.scoring import score

        if self.tokenizer.decode is None:
            raise ValueError(f"{cell.task} decodes its answers: the {self.tokenizer.name} tokenizer cannot decode")
        sample = self.builder.build(cell.task, cell.length, cell.index, cell.depth)
        device = next(self.model.parameters()).device
        out = greedy_generate(self.model, torch.tensor(sample.prompt, device=device), sample.max_new_tokens,
                              eos_token_id=self.tokenizer.eos_token_id)
        prediction = self.tokenizer.decode(out.new_tokens)
        return {"score": score(sample.metric, prediction, sample.references), "prediction": prediction,
                "references": sample.references, "prompt_tokens": len(sample.prompt), "switched_at": out.switched_at}


def _meta(config: EvalConfig, tokenizer: EvalTokenizer) -> dict[str, Any]:
    return {"model": config.model, "tokenizer": tokenizer.name, "seed": config.seed, "books": config.books,
            "dtype": config.dtype}


def _books(config: EvalConfig) -> list[tuple[str, str]]:
    from longrope2.data.books import load_books, load_text_files

    books = load_text_files(config.books) if config.books else load_books(progress=True)
    return [(b.title, b.text) for b in books]


def run_eval(config: EvalConfig, model=None, hf_tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the eval; ``model``/``hf_tokenizer`` may be passed in already loaded."""
    from tqdm import tqdm

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if model is None:
        model, hf_tokenizer = load_model(config.model, config.dtype, config.attn_implementation,
                                           config.megatron_model)
    tokenizer = eval_tokenizer(hf_tokenizer, config, model.config.vocab_size)
    meta = _meta(config, tokenizer)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        changed = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{out} holds an eval with other settings {changed}; choose another output_dir")
    _atomic_write(meta_path, json.dumps(meta, indent=1))

    switch = RopeSwitch(model)
    ropes = [resolve_rope(spec, switch.geometry, config.target_length) for spec in config.ropes]
    labels = [r.label for r in ropes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two rope configs share a label: {labels}; name them LABEL=PATH")
    store = ResultStore(out / "results.jsonl")
    groups = plan(config)
    total = sum(len(cells) for _, _, cells in groups) * len(ropes)
    done = sum(cell.key(rope) in store for _, _, cells in groups for cell in cells for rope in ropes)
    evaluator = Evaluator(config, model, tokenizer, _books(config))
    bar = tqdm(total=total, initial=done, desc="eval cells", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    last_length, computed = None, False
    for length, task, cells in groups:
        if computed and (length != last_length or config.order == "task"):
            write_report(config, out, ropes, store, switch.geometry, started, plots=True)
            computed = False
        last_length = length
        for rope in ropes:
            todo = [c for c in cells if c.key(rope) not in store]
            if not todo:
                continue
            computed = True
            switch.apply(rope)
            for cell in todo:
                bar.set_postfix_str(f"{task} {length} {rope.label}")
                t0 = time.perf_counter()
                result = evaluator.compute(cell)
                store.add({"key": cell.key(rope), "rope": rope.label, "fingerprint": rope.fingerprint,
                           **{k: v for k, v in asdict(cell).items()}, **result,
                           "seconds": round(time.perf_counter() - t0, 3)})
                bar.update(1)
        if computed:
            write_report(config, out, ropes, store, switch.geometry, started)
    bar.close()
    lm_eval_results = run_lm_eval(config, model, hf_tokenizer, ropes, switch, store) \
        if config.short_context.lm_eval_tasks else None
    return write_report(config, out, ropes, store, switch.geometry, started, plots=True, complete=True,
                        lm_eval=lm_eval_results)


# --- lm-evaluation-harness (optional) ------------------------------------------------------------
def run_lm_eval(config: EvalConfig, model, hf_tokenizer, ropes: list[Rope], switch: RopeSwitch,
                store: ResultStore) -> dict[str, Any]:
    """lm_eval tasks per rope when the package and its task data are available; else a reason."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {"skipped": "lm_eval (lm-evaluation-harness) is not installed; `pip install lm_eval` and make its "
                           "task datasets available to run " + ", ".join(config.short_context.lm_eval_tasks)}
    if hf_tokenizer is None:
        return {"skipped": "lm_eval needs the checkpoint's tokenizer"}
    results: dict[str, Any] = {}
    for rope in ropes:
        key = f"lm_eval|{rope.fingerprint}|{','.join(config.short_context.lm_eval_tasks)}|{config.short_context.lm_eval_limit}"
        if key not in store:
            switch.apply(rope)
            try:
                lm = HFLM(pretrained=model, tokenizer=hf_tokenizer, batch_size=1)
                raw = simple_evaluate(model=lm, tasks=list(config.short_context.lm_eval_tasks),
                                      limit=config.short_context.lm_eval_limit)
            except Exception as error:  # task data missing offline, unknown task, ...
                return {"skipped": f"lm_eval could not run ({type(error).__name__}: {str(error)[:300]})"}
            metrics = {task: {m: v for m, v in values.items() if isinstance(v, (int, float)) and "stderr" not in m}
                       for task, values in raw["results"].items()}
            store.add({"key": key, "task": "lm_eval", "rope": rope.label, "fingerprint": rope.fingerprint,
                       "metrics": metrics})
        results[rope.label] = store.records[key]["metrics"]
    return results


# --- aggregation and report ------------------------------------------------------------------------
def summarize(records: Iterator[dict], ropes: list[Rope]) -> dict[str, Any]:
    fingerprints = {r.fingerprint: r.label for r in ropes}
    nll: dict = defaultdict(lambda: [0.0, 0, 0])  # (task, rope, length) -> nll, tokens, samples
    scores: dict = defaultdict(list)  # (task, rope, length) -> [score]
    depth_scores: dict = defaultdict(list)  # (rope, length, depth) -> [score] (needle)
    seconds = 0.0
    for record in records:
        seconds += record.get("seconds", 0.0)
        label = fingerprints.get(record.get("fingerprint"))
        if label is None or record["task"] == "lm_eval":
            continue
        key = (record["task"], label, record["length"])
        if "nll" in record:
            acc = nll[key]
            acc[0] += record["nll"]
            acc[1] += record["count"]
            acc[2] += 1
        else:
            scores[key].append(record["score"])
            if record["task"] == "needle" and record.get("depth") is not None:
                depth_scores[label, record["length"], record["depth"]].append(record["score"])
    summary: dict[str, Any] = {"ropes": {r.label: {"spec": r.spec, "fingerprint": r.fingerprint} for r in ropes},
                               "metrics": {}, "compute_seconds": round(seconds, 1)}
    metrics = summary["metrics"]
    for (task, label, length), (total, count, samples) in nll.items():
        metrics.setdefault(task, {}).setdefault(label, {})[str(length)] = {
            "ppl": math.exp(total / count) if count else math.inf, "samples": samples, "tokens": count}
    for (task, label, length), values in scores.items():
        metrics.setdefault(task, {}).setdefault(label, {})[str(length)] = {
            "accuracy": 100 * sum(values) / len(values), "samples": len(values)}
    ruler = [t for t in metrics if t not in PPL_TASKS and t not in ("passkey", "needle")]
    if ruler:
        average: dict = defaultdict(lambda: defaultdict(list))
        for task in ruler:
            for label, by_length in metrics[task].items():
                for length, cell in by_length.items():
                    average[label][length].append(cell["accuracy"])
        summary["ruler_average"] = {label: {n: {"accuracy": sum(v) / len(v), "tasks": len(v)} for n, v in by.items()}
                                    for label, by in average.items()}
    if depth_scores:
        heat: dict = defaultdict(dict)
        for (label, length, depth), values in depth_scores.items():
            heat[label].setdefault(str(length), {})[f"{depth:g}"] = 100 * sum(values) / len(values)
        summary["needle_depths"] = heat
    short = metrics.get("short_ppl")
    if short:
        base = "original" if "original" in short else next(iter(short))
        summary["retention_baseline"] = base
        summary["short_ppl_ratio"] = {label: {n: cell["ppl"] / short[base][n]["ppl"]
                                              for n, cell in by.items() if n in short[base]}
                                      for label, by in short.items()}
    return summary


def _sorted_lengths(by_rope: dict) -> list[str]:
    return sorted({n for by in by_rope.values() for n in by}, key=int)


def _table(title: str, by_rope: dict, field: str, fmt: str, labels: list[str]) -> list[str]:
    lengths = _sorted_lengths(by_rope)
    lines = [f"### {title}", "", "| rope | " + " | ".join(f"{int(n) // 1024}k" if int(n) % 1024 == 0 else n
                                                         for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for label in labels:
        if label in by_rope:
            cells = [format(by_rope[label][n][field], fmt) if n in by_rope[label] else "" for n in lengths]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(config: EvalConfig, summary: dict, geometry, elapsed: float, complete: bool) -> str:
    labels = list(summary["ropes"])
    metrics = summary["metrics"]
    counts = []
    for task, section in (("needle_ppl", config.needle_ppl), ("book_ppl", config.book_ppl),
                          ("short_ppl", config.short_context), ("passkey", config.passkey),
                          ("needle", config.needle), ("ruler", config.ruler)):
        if section.samples:
            extra = ""
            if task in ("passkey", "needle"):
                extra = f" x {len(section.depths)} depths" if section.depths else " (random depths)"
            elif task == "ruler":
                extra = f" x {len(section.tasks)} tasks"
            elif task in ("book_ppl", "short_ppl"):
                extra = f", last {section.last_tokens} tokens scored"
            counts.append(f"{task} {section.samples}{extra}")
    lines = [f"# longrope2 eval: {config.model}", "",
             f"Original window {geometry.original_max_position_embeddings} tokens; greedy decoding; "
             f"{config.attn_implementation} attention, {config.dtype}; seed {config.seed}; "
             f"{'complete' if complete else 'PARTIAL (still running or interrupted)'}, "
             f"{summary['compute_seconds'] / 60:.1f} min of sample compute in all ({elapsed / 60:.1f} min in the "
             f"last run).", "",
             "Samples per length: " + ("; ".join(counts) or "none") + ".", "",
             "Rope configs: " + ", ".join(f"`{label}` ({summary['ropes'][label]['spec']})" for label in labels) + ".", ""]
    for task in ("needle_ppl", "book_ppl"):
        if task in metrics:
            lines += _table(TASK_TITLES[task], metrics[task], "ppl", ".3f", labels)
    for task in ("passkey", "needle"):
        if task in metrics:
            lines += _table(TASK_TITLES[task], metrics[task], "accuracy", ".1f", labels)
    if "ruler_average" in summary:
        for task in config.ruler.tasks:
            if task in metrics:
                lines += _table(f"RULER {task} (%)", metrics[task], "accuracy", ".1f", labels)
        lines += _table("RULER average over tasks (%)", summary["ruler_average"], "accuracy", ".1f", labels)
    if "short_ppl" in metrics:
        lines += _table(TASK_TITLES["short_ppl"], metrics["short_ppl"], "ppl", ".3f", labels)
        ratio = {label: {n: {"r": v} for n, v in by.items()} for label, by in summary["short_ppl_ratio"].items()}
        lines += _table(f"Short-context PPL ratio vs `{summary['retention_baseline']}` (1.000 = no loss)", ratio, "r",
                        ".4f", labels)
    lm_eval = summary.get("lm_eval")
    if lm_eval:
        lines += ["### lm-evaluation-harness", ""]
        if "skipped" in lm_eval:
            lines += [f"Skipped: {lm_eval['skipped']}", ""]
        else:
            lines += ["```", json.dumps(lm_eval, indent=1), "```", ""]
    return "\n".join(lines)


def write_report(config: EvalConfig, out: Path, ropes: list[Rope], store: ResultStore, geometry, started: float,
                 plots: bool = False, complete: bool = False, lm_eval: dict | None = None) -> dict[str, Any]:
    summary = summarize(iter(store.records.values()), ropes)
    if lm_eval is not None:
        summary["lm_eval"] = lm_eval
    summary["complete"] = complete
    summary["original_window"] = geometry.original_max_position_embeddings
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(out / "report.md", markdown(config, summary, geometry, time.time() - started, complete) + "\n")
    if plots:
        plot_scores(out / "scores.png", summary, geometry.original_max_position_embeddings)
        if "needle_depths" in summary:
            plot_needle_heatmap(out / "needle_heatmap.png", summary)
    return summary


def plot_scores(path: Path, summary: dict, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, summary["metrics"][t], "ppl") for t in ("needle_ppl", "book_ppl", "short_ppl")
              if t in summary["metrics"]]
    panels += [(t, summary["metrics"][t], "accuracy") for t in ("passkey", "needle") if t in summary["metrics"]]
    if "ruler_average" in summary:
        panels.append(("ruler_average", summary["ruler_average"], "accuracy"))
    if not panels:
        return
    labels = list(summary["ropes"])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, by_rope, field) in zip(axes.flat, panels):
        for i, label in enumerate(labels):
            if label in by_rope:
                lengths = sorted(by_rope[label], key=int)
                ax.plot([int(n) for n in lengths], [by_rope[label][n][field] for n in lengths], ".-",
                        color=f"C{i}", label=label)
        ax.axvline(window, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(n) for by in by_rope.values() for n in by})
        ax.set_xticks(ticks, [f"{n / 1024:g}k" for n in ticks])
        ax.minorticks_off()
        if field == "ppl":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-5, 105)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity" if field == "ppl" else "accuracy (%)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle_heatmap(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heat = summary["needle_depths"]
    labels = [label for label in summary["ropes"] if label in heat]
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        lengths = sorted(heat[label], key=int)
        depths = sorted({d for by in heat[label].values() for d in by}, key=float)
        grid = [[heat[label][n].get(d, float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (row, col), value in np.ndenumerate(np.array(grid, dtype=float)):
            if math.isfinite(value):
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{int(n) / 1024:g}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_title(label)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
