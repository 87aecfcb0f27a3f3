"""``longrope2 eval``: every task x length x rope cell on one loaded model, resumable, and
scaled out under torchrun.

Files in ``output_dir``:

    meta.json       what was evaluated (model, tokenizer, seed, books, RULER's data); a rerun must match it
    results.jsonl   one line per sample as soon as it is computed -- a rerun skips those
    summary.json    aggregated metrics, rewritten after every (length, task) group (``eval/report.py``)
    report.md       the tables of summary.json
    scores.png      each metric vs length, one line per rope config
    needle_heatmap.png   needle-in-a-haystack accuracy, depth x length, one panel per rope

Cells run length by length (shortest first), each length for every rope, so an interrupted eval
already compares the ropes on the lengths it finished. Generation tasks decode ``batch_size``
prompts of one task and length per forward (``greedy_generate_batch``).

Under torchrun each rank holds a model replica, reads every results file first (so a rerun with
any world size skips whatever an earlier run finished) and takes every world-th of the cells left,
in the order they run (``Ranks.share``), writing ``results.rank<R>.jsonl``. Rank 0 writes the
reports and, once all ranks are through, appends the rank files to ``results.jsonl`` and removes
them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from longrope2.eval.config import EvalConfig
from longrope2.eval.model import Rope, RopeSwitch, check_rope_spec, load_model, resolve_rope
from longrope2.eval.report import PPL_TASKS, atomic_write, write_report
from longrope2.eval.ruler import RULER_TASKS, ChatWrap, read_task_file, sample_score, task_file, to_sample
from longrope2.eval.tasks import Corpus, TaskBuilder, sample_rng

TASK_ORDER = ("needle_ppl", "passkey", "book_ppl", "short_ppl", "needle", *RULER_TASKS)


@dataclass
class EvalTokenizer:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str] | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    name: str
    pad_token_id: int = 0
    bos_text: str | None = None


def _stop_ids(hf_tokenizer, generation_config) -> list[int] | None:
    """The tokenizer's EOS and the model's generation-config EOS ids (what ``generate`` stops at)."""
    ids: list[int] = []
    for value in (hf_tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        for i in ([value] if isinstance(value, int) else value or []):
            if i not in ids:
                ids.append(int(i))
    return ids or None


def eval_tokenizer(hf_tokenizer, config: EvalConfig, vocab_size: int, generation_config=None) -> EvalTokenizer:
    from longrope2.data import tokenize

    if config.tokenizer == "hashed-words" or hf_tokenizer is None:
        if config.tokenizer != "hashed-words":
            raise ValueError(f"{config.model} has no tokenizer; set `tokenizer: hashed-words` (PPL tasks only)")
        hashed = tokenize.hashed_words(vocab_size)
        return EvalTokenizer(hashed.encode, None, None, None, hashed.name)
    wrapped = tokenize.from_hf(hf_tokenizer, config.model)
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
    return EvalTokenizer(wrapped.encode, lambda ids: hf_tokenizer.decode(ids, skip_special_tokens=True),
                         wrapped.bos_token_id, _stop_ids(hf_tokenizer, generation_config), type(hf_tokenizer).__name__,
                         pad if pad is not None else 0, hf_tokenizer.bos_token)


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    index: int
    depth: float | None = None

    def key(self, rope: Rope) -> str:
        depth = "" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}|{rope.fingerprint}|{self.length}|{depth}|{self.index}"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun ranks (1 rank without torchrun)."""

    rank: int = 0
    world: int = 1

    def share(self, pending: list[str]) -> set[str]:
        """This rank's keys among ``pending`` (the cells no run has finished, in the order they
        run): every world-th one, so each task, length and rope splits evenly whatever an
        earlier run left over. Every rank computes ``pending`` from the same snapshot of the
        results files (``run_eval`` holds a barrier before anyone writes), so the shares are
        disjoint and together are exactly what is left. (A crc32 of the key, used before, gave
        every task the same split, 4 of 10 indices to rank 0 of 2, and a resumed run 8 cells on
        one rank and 24 on the other.)"""
        return set(pending[self.rank::self.world])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            # gloo only coordinates (barriers); the ranks never exchange tensors. Ranks finish their
            # shares at different times, hence the long timeout.
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=48))
        if torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()


class ResultStore:
    """``results.jsonl`` plus the rank files of an unmerged multi-rank run: every record is read
    (a rerun skips them); this process appends to its own file, flushed per sample."""

    def __init__(self, out: Path, ranks: Ranks = Ranks()):
        self.out, self.main = out, out / "results.jsonl"
        self.path = self.main if ranks.world == 1 else out / f"results.rank{ranks.rank}.jsonl"
        self.records: dict[str, dict] = {}
        self.reload()

    def files(self) -> list[Path]:
        return [p for p in [self.main, *sorted(self.out.glob("results.rank*.jsonl"))] if p.exists()]

    def reload(self) -> None:
        for path in self.files():
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

    def merge(self) -> None:
        """Append the rank files' complete lines to ``results.jsonl`` and remove them."""
        for path in sorted(self.out.glob("results.rank*.jsonl")):
            lines = [line for line in path.read_text().splitlines() if line.strip() and _is_json(line)]
            with open(self.main, "a") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            path.unlink()
        self.path = self.main
        self.reload()


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def plan(config: EvalConfig, ruler_samples: Callable[[str, int], tuple[int, str | None]] | None = None
         ) -> tuple[list[tuple[int, str, list[Cell]]], list[str]]:
    """``(length, task, cells)`` groups -- shortest length first (``order: length``), or task by
    task (``order: task``: needle PPL at every length, then passkey, ...) -- and the RULER tasks
    skipped, with why. ``ruler_samples(task, length)`` says how many samples a RULER task has."""
    groups: dict[tuple[int, str], list[Cell]] = defaultdict(list)
    skipped: list[str] = []

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
                count, reason = ruler_samples(task, n) if ruler_samples else (config.ruler.samples, None)
                if reason:
                    skipped.append(f"RULER {task} at {n}: {reason}")
                if count:
                    groups[n, task] += [Cell(task, n, i) for i in range(count)]
    if config.order == "task":
        rank = {t: i for i, t in enumerate(TASK_ORDER)}
        ordered = sorted(groups.items(), key=lambda kv: (rank[kv[0][1]], kv[0][0]))
    else:
        ordered = sorted(groups.items(), key=lambda kv: kv[0][0])
    return [(n, t, cells) for (n, t), cells in ordered], skipped


class Evaluator:
    """Computes cells; samples are rebuilt from the seed (or re-read from RULER's files)."""

    def __init__(self, config: EvalConfig, model, tokenizer: EvalTokenizer, books: list[tuple[str, str]],
                 hf_tokenizer=None):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.books = books
        self.corpus = Corpus(tokenizer.encode, books, tokenizer.bos_token_id)
        new_tokens = {}
        for task in ("passkey", "needle"):
            if getattr(config, task).max_new_tokens is not None:
                new_tokens[task] = getattr(config, task).max_new_tokens
        self.builder = TaskBuilder(self.corpus, config.seed, new_tokens)
        self.chat = ChatWrap.from_tokenizer(hf_tokenizer) if config.ruler.chat_template else None
        self._ruler_gen = None
        self._ruler_files: dict[tuple[str, int], list] = {}
        self._needle_docs: dict[int, list] = {}

    # --- RULER --------------------------------------------------------------------------------
    @property
    def ruler_generator(self):
        if self._ruler_gen is None:
            from longrope2.eval.ruler_gen import RulerGenerator

            ruler = self.config.ruler
            self._ruler_gen = RulerGenerator(lambda text: len(self.tokenizer.encode(text)), self.books,
                                             seed=self.config.seed, chat=self.chat,
                                             qa_files={"qa_1": ruler.squad, "qa_2": ruler.hotpotqa})
        return self._ruler_gen

    def ruler_records(self, task: str, length: int) -> list:
        if (task, length) not in self._ruler_files:
            self._ruler_files[task, length] = read_task_file(task_file(self.config.ruler.data_dir, task, length))
        return self._ruler_files[task, length]

    def ruler_samples(self, task: str, length: int) -> tuple[int, str | None]:
        """How many samples RULER's ``task`` has at ``length`` here, and why fewer than asked."""
        wanted = self.config.ruler.samples
        if self.config.ruler.data_dir:
            path = task_file(self.config.ruler.data_dir, task, length)
            if not path.is_file():
                return 0, f"skipped: no RULER data file {path}"
            have = len(self.ruler_records(task, length))
            return min(wanted, have), (f"{have} samples only ({path} holds no more than that)"
                                       if have < wanted else None)
        reason = self.ruler_generator.available(task)
        return (0, f"skipped: {reason}") if reason else (wanted, None)

    def ruler_sample(self, cell: Cell):
        if self.config.ruler.data_dir:
            record = self.ruler_records(cell.task, cell.length)[cell.index]
        else:
            record = self.ruler_generator.record(cell.task, cell.length, cell.index)
        return to_sample(record, cell.task, cell.length, cell.index, self.tokenizer.encode,
                         self.tokenizer.bos_token_id, self.config.ruler.max_new_tokens.get(cell.task),
                         bos_text=self.tokenizer.bos_text)

    # --- samples ------------------------------------------------------------------------------
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

    def compute(self, cells: list[Cell]) -> list[dict[str, Any]]:
        """Results of cells of one task and length (generation tasks as one batch)."""
        from longrope2.eval import ppl

        task = cells[0].task
        if task == "needle_ppl":
            return [dict(zip(("nll", "count"), ppl.needle_nll(self.model, self.needle_document(c)))) for c in cells]
        if task in ("book_ppl", "short_ppl"):
            last = self.config.book_ppl.last_tokens if task == "book_ppl" else self.config.short_context.last_tokens
            return [dict(zip(("nll", "count"), ppl.book_window_nll(self.model, self.book_window(c),
                                                                   min(last, c.length // 2)))) for c in cells]
        return self.generate(cells)

    def generate(self, cells: list[Cell]) -> list[dict[str, Any]]:
        from longrope2.eval.generate import greedy_generate_batch
        from longrope2.eval.scoring import score

        if self.tokenizer.decode is None:
            raise ValueError(f"{cells[0].task} decodes its answers: the {self.tokenizer.name} tokenizer cannot decode")
        ruler = cells[0].task in RULER_TASKS
        samples = [self.ruler_sample(c) if ruler else self.builder.build(c.task, c.length, c.index, c.depth)
                   for c in cells]
        outs = greedy_generate_batch(self.model, [s.prompt for s in samples], samples[0].max_new_tokens,
                                     pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        results = []
        for sample, out in zip(samples, outs):
            prediction = self.tokenizer.decode(out.new_tokens)
            value = sample_score(sample.task, prediction, sample.references) if ruler else \
                score(sample.metric, prediction, sample.references)
            results.append({"score": value, "prediction": prediction, "references": sample.references,
                            "prompt_tokens": len(sample.prompt), "switched_at": out.switched_at})
        return results


def _meta(config: EvalConfig, tokenizer: EvalTokenizer) -> dict[str, Any]:
    meta = {"model": config.model, "tokenizer": tokenizer.name, "seed": config.seed, "books": config.books,
            "dtype": config.dtype}
    if config.ruler.samples:  # a different RULER source would mix samples under one key
        meta["ruler_data_dir"] = config.ruler.data_dir
        meta["ruler_chat_template"] = config.ruler.chat_template
    return meta


def _books(config: EvalConfig) -> list[tuple[str, str]]:
    from longrope2.data.books import load_books, load_text_files

    books = load_text_files(config.books) if config.books else load_books(progress=False)
    return [(b.title, b.text) for b in books]


def _device(config: EvalConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def run_eval(config: EvalConfig, model=None, hf_tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the eval; ``model``/``hf_tokenizer`` may be passed in already loaded."""
    from tqdm import tqdm

    ranks = Ranks.from_env()
    out = Path(config.output_dir)
    started = time.time()
    for spec in config.ropes:  # a typo fails now, not after loading the model
        check_rope_spec(spec)
    if model is None:
        model, hf_tokenizer = load_model(config.model, config.dtype, config.attn_implementation,
                                         config.megatron_model)
        model.to(_device(config))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = eval_tokenizer(hf_tokenizer, config, model.config.vocab_size, getattr(model, "generation_config", None))
    meta = _meta(config, tokenizer)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        changed = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{out} holds an eval with other settings {changed}; choose another output_dir")
    ranks.barrier()  # every rank has compared meta.json before rank 0 writes it
    if ranks.rank == 0:
        atomic_write(meta_path, json.dumps(meta, indent=1))

    switch = RopeSwitch(model)
    ropes = [resolve_rope(spec, switch.geometry, config.target_length) for spec in config.ropes]
    labels = [r.label for r in ropes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two rope configs share a label: {labels}; name them LABEL=PATH")
    store = ResultStore(out, ranks)
    evaluator = Evaluator(config, model, tokenizer, _books(config), hf_tokenizer)
    groups, skipped = plan(config, evaluator.ruler_samples)
    mine = ranks.share([c.key(r) for _, _, cells in groups for r in ropes for c in cells if c.key(r) not in store])
    ranks.barrier()  # every rank has its share of the same snapshot before anyone writes a result

    def report(**kwargs):
        if ranks.rank == 0:
            store.reload()  # the other ranks' progress too
            return write_report(config, out, ropes, store.records.values(), switch.geometry, started,
                                skipped=skipped, **kwargs)

    bar = tqdm(total=len(mine), desc=f"eval cells (rank {ranks.rank}/{ranks.world})",
               disable=not progress or ranks.rank != 0, dynamic_ncols=True, file=sys.stderr)
    last_length, computed = None, False
    for length, task, cells in groups:
        if computed and (length != last_length or config.order == "task"):
            report(plots=True)
            computed = False
        last_length = length
        step = 1 if task in PPL_TASKS else config.batch_size
        for rope in ropes:
            todo = [c for c in cells if c.key(rope) in mine]
            if not todo:
                continue
            computed = True
            switch.apply(rope)
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                bar.set_postfix_str(f"{task} {length} {rope.label}")
                t0 = time.perf_counter()
                results = evaluator.compute(chunk)
                seconds = round((time.perf_counter() - t0) / len(chunk), 3)  # a batch's time, shared
                for cell, result in zip(chunk, results):
                    store.add({"key": cell.key(rope), "rope": rope.label, "fingerprint": rope.fingerprint,
                               **asdict(cell), **result, "seconds": seconds})
                bar.update(len(chunk))
        if computed:
            report()
    bar.close()
    ranks.barrier()  # every rank's share is on disk
    summary = None
    if ranks.rank == 0:
        store.merge()
        lm_eval_results = run_lm_eval(config, model, hf_tokenizer, ropes, switch, store) \
            if config.short_context.lm_eval_tasks else None
        summary = report(plots=True, complete=True, lm_eval=lm_eval_results)
    ranks.barrier()  # rank 0 has merged and reported
    return summary if summary is not None else json.loads((out / "summary.json").read_text())


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


