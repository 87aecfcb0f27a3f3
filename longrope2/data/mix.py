"""``longrope2 prepare-data --config MIX.yaml``: a length-bucketed data mixture (the LongRoPE2
mid-training mix, paper Table 1) tokenized in parallel, resumable, shardable across nodes.

A mix config names **buckets** (token-length ranges, e.g. ``<= L_train``, ``L_train..100k``,
``100k..200k``) and **sources** (paths, folders or globs of JSONL / parquet / txt, the text
field, a token budget per bucket, and what happens to documents that fit no bucket). Three
steps, each safe to kill and rerun:

1. **plan**: every source file is split into shards of at most ``records_per_shard`` records
   (a ``.txt`` book is one record, JSONL lines are counted in one streaming pass, parquet row
   counts come from its footer). The shard list is a pure function of the config and the files.
2. **tokenize**: each shard is streamed (records one at a time, never a whole file in memory),
   tokenized, sorted into buckets by the length rules below, and appended to one part per bucket
   under ``OUTPUT/parts/`` (raw ids and lengths), with a ``.done.json`` marker last; ``--workers N`` runs N
   processes, ``--shard-index I --num-shards N`` (a Slurm array task) takes the shards with
   ``k % N == I``. Marked shards are skipped on a rerun.
3. **merge**: once every shard is marked, each bucket's parts are written in config order
   (source, file, record) with megatron-core's ``IndexedDatasetBuilder``, taking each source's
   documents until its budget for that bucket is reached (the document that crosses the budget
   is cut to fit, so the bucket holds exactly the budgeted tokens when the inputs suffice) into
   ``OUTPUT/BUCKET.bin/.idx``; ``OUTPUT/manifest.json`` is written last. Whoever finishes the
   last shard merges (a Slurm array's last task; the merge is idempotent).

Length rules (token counts include the BOS token), per source:

* a document whose length lies in one of the source's buckets goes to that bucket;
* longer than the source's largest bucket: ``longer: cut`` cuts it into pieces of log-uniform
  length over the range the source's buckets span (seeded by ``seed`` and the record's place, so
  the pieces do not depend on sharding or workers), ``drop`` drops it;
* shorter than its smallest bucket: ``shorter: drop`` drops it, ``concat`` joins it with the
  source's following short documents of the same shard until the smallest bucket's minimum is
  reached (a remainder at the end of a shard is dropped);
* a length between two of the source's buckets (a gap): dropped.

Every drop is counted in the manifest. Training reads the result with ``data.manifest`` (the
bucket datasets; the short fraction from the manifest unless set).
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from longrope2 import configs

MANIFEST = "manifest.json"


@dataclass(kw_only=True)
class BucketConfig:
    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")


@dataclass(kw_only=True)
class SourceConfig:
    name: str
    paths: list[str]
    """Files, folders (their .jsonl/.json/.parquet/.txt files) or globs; ``embedded:NAME`` for an
    embedded book; ``embedded`` for all of them."""
    budgets: dict[str, Optional[int]]
    """Tokens this source gives each bucket it feeds; null = all it has."""
    text_field: str = "text"
    longer: str = "cut"
    """A document longer than the source's largest bucket: ``cut`` or ``drop``."""
    shorter: str = "drop"
    """A document shorter than its smallest bucket: ``drop`` or ``concat``."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError(f"source {self.name!r}: no paths")
        if not self.budgets:
            raise ValueError(f"source {self.name!r}: budgets must name at least one bucket")
        for bucket, budget in self.budgets.items():
            if budget is not None and budget < 1:
                raise ValueError(f"source {self.name!r}: budget for {bucket!r} must be >= 1 token or null, got {budget}")
        if self.longer not in ("cut", "drop") or self.shorter not in ("drop", "concat"):
            raise ValueError(f"source {self.name!r}: longer must be cut|drop and shorter drop|concat, got "
                             f"{self.longer!r}, {self.shorter!r}")


@dataclass(kw_only=True)
class MixConfig:
    output: str
    """Folder: BUCKET.bin/.idx per bucket, manifest.json, parts/."""
    tokenizer: str
    """``hashed-words:VOCAB``, ``smollm2``, or an HF tokenizer folder / ``.gguf``."""
    window: int
    """The model's original window (L_train): documents up to it are the short ones the mixed
    sampler packs with the original RoPE; the manifest's short fraction counts their tokens."""
    buckets: dict[str, BucketConfig]
    sources: list[SourceConfig]
    seed: int = 0
    records_per_shard: int = 10_000

    def __post_init__(self) -> None:
        if self.window < 1 or self.records_per_shard < 1:
            raise ValueError(f"window and records_per_shard must be >= 1, got {self.window}, {self.records_per_shard}")
        if not self.buckets or not self.sources:
            raise ValueError("a mix needs at least one bucket and one source")
        ranges = sorted((b.min_tokens, b.max_tokens, name) for name, b in self.buckets.items())
        for (_, hi, a), (lo, _, b) in zip(ranges, ranges[1:]):
            if lo <= hi:
                raise ValueError(f"buckets {a!r} and {b!r} overlap: a document length must pick one bucket")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for source in self.sources:
            unknown = sorted(set(source.budgets) - set(self.buckets))
            if unknown:
                raise ValueError(f"source {source.name!r}: unknown buckets {unknown}; buckets: {sorted(self.buckets)}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MixConfig":
        return configs.load_yaml(cls, path, what="data-mix config")


# --- plan ---------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class Shard:
    index: int
    source: str
    path: str
    """A file, or ``embedded:NAME``."""
    start: int
    stop: int
    """Records ``[start, stop)`` of the file."""


def source_files(source: SourceConfig) -> list[str]:
    """The source's files in a stable order (each path's matches sorted), or a one-line error."""
    from longrope2.data.books import EMBEDDED, embedded_book, is_embedded_spec, load_books

    files: list[str] = []
    for raw in source.paths:
        if raw == "embedded":
            files += [f"{EMBEDDED}{book.key}" for book in load_books(progress=False)]
            continue
        if is_embedded_spec(raw):
            embedded_book(raw[len(EMBEDDED):])  # a clear error for an unknown name
            files.append(raw)
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in SUFFIXES)
        elif any(ch in raw for ch in "*?["):
            found = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).suffix in SUFFIXES)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"source {source.name!r}: {path}: unsupported file type (use {', '.join(SUFFIXES)})")
            found = [str(path)]
        else:
            raise FileNotFoundError(f"source {source.name!r}: {raw}: no such file or folder")
        if not found:
            raise FileNotFoundError(f"source {source.name!r}: {raw} matches no {'/'.join(SUFFIXES)} file")
        files += found
    return files


def count_records(path: str) -> int:
    if path.startswith("embedded:") or path.endswith(".txt"):
        return 1
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def plan_shards(config: MixConfig) -> list[Shard]:
    shards: list[Shard] = []
    for source in config.sources:
        for path in source_files(source):
            records = count_records(path)
            for start in range(0, records, config.records_per_shard):
                shards.append(Shard(len(shards), source.name, path, start,
                                    min(records, start + config.records_per_shard)))
    return shards


# --- tokenize -----------------------------------------------------------------------------------


def iter_records(shard: Shard, text_field: str) -> Iterator[str]:
    """The texts of records ``[start, stop)``, streamed."""
    path = shard.path
    if path.startswith("embedded:"):
        from longrope2.data.books import embedded_book

        yield embedded_book(path[len("embedded:"):]).text
    elif path.endswith(".txt"):
        yield Path(path).read_text(encoding="utf-8", errors="replace")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if shard.start <= row < shard.stop:
                    yield text
                row += 1
            if row >= shard.stop:
                return
    else:
        record = 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if shard.start <= record < shard.stop:
                    value = json.loads(line)
                    if text_field not in value:
                        raise ValueError(f"{path}:{line_no}: no {text_field!r} field (keys: {sorted(value)})")
                    yield value[text_field]
                record += 1
                if record >= shard.stop:
                    return


def _part(output: Path, shard: Shard, bucket: str) -> Path:
    """A shard's documents of one bucket: ``.tokens`` (raw ids, appended as they come) and
    ``.lengths.npy``; megatron's builder makes the bucket datasets from them at the merge, so
    the workers never import megatron."""
    return output / "parts" / f"{shard.index:06d}.{bucket}"


def _marker(output: Path, shard: Shard) -> Path:
    return output / "parts" / f"{shard.index:06d}.done.json"


class _Router:
    """The length rules of one source (module docstring), as documents come in."""

    def __init__(self, config: MixConfig, source: SourceConfig):
        self.ranges = sorted((config.buckets[b].min_tokens, config.buckets[b].max_tokens, b) for b in source.budgets)
        self.lo, self.hi = self.ranges[0][0], self.ranges[-1][1]
        self.source = source
        self.dropped = {"longer": 0, "shorter": 0, "gap": 0}
        self.pending: list[int] = []

    def bucket(self, length: int) -> str | None:
        for lo, hi, name in self.ranges:
            if lo <= length <= hi:
                return name
        return None

    def route(self, ids: list[int], rng: random.Random) -> Iterator[tuple[str, list[int]]]:
        if len(ids) > self.hi:
            if self.source.longer == "drop":
                self.dropped["longer"] += 1
                return
            from longrope2.data.indexed import cut_lengths

            start = 0
            for n in cut_lengths(len(ids), self.lo, self.hi, rng):
                yield from self.route(ids[start:start + n], rng)
                start += n
            return
        if len(ids) < self.lo:
            if self.source.shorter == "drop":
                self.dropped["shorter"] += 1
                return
            self.pending += ids
            if len(self.pending) < self.lo:
                return
            ids, self.pending = self.pending, []
            if len(ids) > self.hi:  # only possible when a bucket is narrower than the pieces joined
                yield from self.route(ids, rng)
                return
        name = self.bucket(len(ids))
        if name is None:
            self.dropped["gap"] += 1
            return
        yield name, ids


_TOKENIZER = None
"""(tokenizer, vocab) of this process, loaded once (forked workers inherit the parent's)."""


def _tokenizer(spec: str):
    global _TOKENIZER
    if _TOKENIZER is None or _TOKENIZER[2] != spec:
        from longrope2.data.indexed import tokenizer_from_spec

        _TOKENIZER = (*tokenizer_from_spec(spec), spec)
    return _TOKENIZER[:2]


def tokenize_shard(config: MixConfig, shard: Shard, dtype: type) -> dict[str, Any]:
    """Tokenize one shard into its per-bucket parts (ids as ``dtype``) and its marker, written
    last; returns the marker's content."""
    tokenizer, _ = _tokenizer(config.tokenizer)
    output = Path(config.output)
    source = next(s for s in config.sources if s.name == shard.source)
    router = _Router(config, source)
    files: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {b: [] for b in source.budgets}
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    started, records, tokens = time.perf_counter(), 0, 0
    tmp = f".tmp{os.getpid()}"
    try:
        for offset, text in enumerate(iter_records(shard, source.text_field)):
            records += 1
            ids = bos + tokenizer.encode(text)
            tokens += len(ids)
            rng = random.Random(f"{config.seed}/{shard.path}/{shard.start + offset}")
            for bucket, doc in router.route(ids, rng):
                if bucket not in files:
                    files[bucket] = open(f"{_part(output, shard, bucket)}.tokens{tmp}", "wb")
                files[bucket].write(np.asarray(doc, dtype=dtype).tobytes())
                lengths[bucket].append(len(doc))
    finally:
        for f in files.values():
            f.close()
    router.dropped["shorter"] += 1 if router.pending else 0  # a joined remainder at the shard's end
    for bucket in files:
        prefix = _part(output, shard, bucket)
        np.save(f"{prefix}.lengths{tmp}.npy", np.asarray(lengths[bucket], dtype=np.int64))
        os.replace(f"{prefix}.lengths{tmp}.npy", f"{prefix}.lengths.npy")
        os.replace(f"{prefix}.tokens{tmp}", f"{prefix}.tokens")
    counts = {b: {"documents": len(v), "tokens": int(sum(v))} for b, v in lengths.items()}
    marker = {"shard": asdict(shard), "records": records, "tokens": tokens, "buckets": counts,
              "dropped": router.dropped, "seconds": time.perf_counter() - started}
    path = _marker(output, shard)
    path.with_suffix(tmp).write_text(json.dumps(marker))
    os.replace(path.with_suffix(tmp), path)
    return marker


def _tokenize_task(args: tuple[MixConfig, Shard, type]) -> dict[str, Any]:
    return tokenize_shard(*args)


# --- merge --------------------------------------------------------------------------------------


def merge(config: MixConfig, shards: list[Shard], vocab: int, tokenizer_name: str) -> dict[str, Any]:
    """The bucket datasets and the manifest from every shard's parts (module docstring, step 3)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import torch

    output = Path(config.output)
    for stale in [*output.glob("*.tmp*"), *(output / "parts").glob("*.tmp*")]:  # left by killed runs
        stale.unlink()
    markers = [json.loads(_marker(output, s).read_text()) for s in shards]
    dtype = DType.optimal_dtype(vocab)
    buckets: dict[str, Any] = {}
    taken = {s.name: {b: 0 for b in s.budgets} for s in config.sources}
    short_tokens = total_tokens = 0
    for bucket, spec in config.buckets.items():
        tmp = output / f"{bucket}.tmp{os.getpid()}"
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        documents = tokens = 0
        for source in config.sources:
            if bucket not in source.budgets:
                continue
            budget = source.budgets[bucket]
            for shard, marker in zip(shards, markers):
                left = math.inf if budget is None else budget - taken[source.name][bucket]
                if shard.source != source.name or left <= 0 or not marker["buckets"][bucket]["documents"]:
                    continue
                prefix = _part(output, shard, bucket)
                ids = np.memmap(f"{prefix}.tokens", dtype=dtype, mode="r")
                start = 0
                for length in np.load(f"{prefix}.lengths.npy"):
                    n = int(min(length, left))  # the document that crosses the budget is cut to fit
                    builder.add_document(torch.from_numpy(np.array(ids[start:start + n])), [n])
                    start += int(length)
                    left -= n
                    documents += 1
                    tokens += n
                    taken[source.name][bucket] += n
                    short_tokens += n if n <= config.window else 0
                    if left <= 0:
                        break
                del ids
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", output / f"{bucket}.bin")
        os.replace(f"{tmp}.idx", output / f"{bucket}.idx")
        total_tokens += tokens
        budget = [s.budgets[bucket] for s in config.sources if bucket in s.budgets]
        buckets[bucket] = {"prefix": bucket, "min_tokens": spec.min_tokens, "max_tokens": spec.max_tokens,
                           "budget": None if None in budget else sum(budget), "documents": documents, "tokens": tokens}
    shortfall = {f"{s.name}/{b}": budget - taken[s.name][b] for s in config.sources
                 for b, budget in s.budgets.items() if budget is not None and taken[s.name][b] < budget}
    dropped = {k: sum(m["dropped"][k] for m in markers) for k in ("longer", "shorter", "gap")}
    manifest = {
        "format": 1,
        "tokenizer": tokenizer_name,
        "vocab_size": vocab,
        "seed": config.seed,
        "window": config.window,
        "buckets": buckets,
        "sources": taken,
        "tokens": total_tokens,
        "short_fraction": short_tokens / total_tokens if total_tokens else 0.0,
        "shortfall": shortfall,
        "dropped": dropped,
        "records": sum(m["records"] for m in markers),
        "tokenized_tokens": sum(m["tokens"] for m in markers),
        "shards": len(shards),
        "config": asdict(config),
    }
    tmp = output / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, output / MANIFEST)
    return manifest


# --- the whole job ------------------------------------------------------------------------------


def run_mix(config: MixConfig, workers: int = 1, shard_index: int = 0, num_shards: int = 1,
            progress: bool = True) -> dict[str, Any] | None:
    """Plan, tokenize this task's unfinished shards with ``workers`` processes, and merge once
    every shard is done. Returns the manifest, or None while other tasks' shards are missing."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm import tqdm

    if workers < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need --workers >= 1 and 0 <= --shard-index < --num-shards, got {workers}, "
                         f"{shard_index}, {num_shards}")
    from megatron.core.datasets.indexed_dataset import DType

    tokenizer, vocab = _tokenizer(config.tokenizer)  # a bad spec fails before any work
    dtype = DType.optimal_dtype(vocab)
    shards = plan_shards(config)
    output = Path(config.output)
    (output / "parts").mkdir(parents=True, exist_ok=True)
    plan = output / "parts" / "plan.json"
    planned = json.dumps([asdict(s) for s in shards])
    if plan.is_file() and plan.read_text() != planned:
        raise ValueError(f"{output}: its parts were made from other inputs or another config (parts/plan.json "
                         "differs); use another output folder or remove this one")
    plan.write_text(planned)
    mine = [s for s in shards if s.index % num_shards == shard_index and not _marker(output, s).is_file()]
    records = sum(s.stop - s.start for s in mine)
    bar = tqdm(total=records, desc=f"tokenizing {len(mine)} shards", unit=" records", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    started, tokens = time.perf_counter(), 0

    def done(marker: dict[str, Any]) -> None:
        nonlocal tokens
        tokens += marker["tokens"]
        bar.update(marker["records"])
        bar.set_postfix(tokens=f"{tokens:,}", tok_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")

    if workers == 1 or len(mine) <= 1:
        for shard in mine:
            done(tokenize_shard(config, shard, dtype))
    else:
        # fork: the workers inherit the loaded tokenizer and the imports; HF tokenizers must not
        # start their own thread pool before the fork
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for marker in pool.map(_tokenize_task, [(config, s, dtype) for s in mine]):
                done(marker)
    bar.close()
    if mine:
        seconds = time.perf_counter() - started
        print(f"[prepare] tokenized {tokens:,} tokens of {len(mine)} shards in {seconds:.1f} s "
              f"({tokens / seconds:,.0f} tokens/s, {workers} worker{'s' if workers > 1 else ''})", file=sys.stderr)
    if not all(_marker(output, s).is_file() for s in shards):
        return None
    return merge(config, shards, vocab, tokenizer.name)


def read_mix_manifest(path: str | Path) -> tuple[list[str], float, dict[str, Any]]:
    """(bucket dataset prefixes with documents, short fraction, manifest) of a mix manifest file
    or folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"data-mix manifest {path} not found (build it with "
                                "`longrope2 prepare-data --config MIX.yaml`)")
    manifest = json.loads(path.read_text())
    prefixes = [str(path.parent / b["prefix"]) for b in manifest["buckets"].values() if b["documents"]]
    return prefixes, float(manifest["short_fraction"]), manifest
