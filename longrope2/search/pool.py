"""The distributed candidate pool: every data-parallel group of the model-parallel layout is a
worker, and workers pull candidate indices from the torch.distributed store.

A worker's leader (TP, PP and CP rank 0) takes the next index with ``store.add`` and broadcasts
it to the rest of its worker, which scores it together (a worker may span TP/PP/CP ranks); the
leader publishes the score under the index. A slow worker never holds a fast one back: the fast
one simply takes more indices. Every rank then reads all scores back, so every rank holds the
same search state without a broadcast. Scores already known (a resumed search) are published
without running the model.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _finite_or_none(value):
    """A score (a float, or a list of per-document NLLs) for strict JSON: inf/nan -> null."""
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value if math.isfinite(value) else None


class WorkerLost(RuntimeError):
    """A worker stopped publishing scores; the search state on disk can be resumed."""


def _default_store() -> dist.Store:
    # The rendezvous store torchrun already runs; torch exposes it only under this name.
    return dist.distributed_c10d._get_default_store()


class CandidatePool:
    def __init__(self, score_fn: Callable[[object], float], log_path: Path | None = None,
                 timeout_s: float = 1800.0, store: dist.Store | None = None):
        self.score_fn = score_fn
        self.store = store or _default_store()
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.worker = parallel_state.get_data_parallel_rank()
        self.num_workers = parallel_state.get_data_parallel_world_size()
        self.mp_rank = parallel_state.get_model_parallel_group().rank()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.is_leader = self.mp_rank == 0 and self.cp_rank == 0
        self.log_path = log_path
        self.scored_here = 0

    def _share_index(self, index: int) -> int:
        """The leader's index to every rank of its worker (CP, then TP x PP)."""
        value = torch.tensor([index], dtype=torch.int64)
        if torch.cuda.is_available():
            value = value.cuda()
        cp_group = parallel_state.get_context_parallel_group()
        if self.mp_rank == 0 and dist.get_world_size(cp_group) > 1:
            dist.broadcast(value, src=dist.get_global_rank(cp_group, 0), group=cp_group)
        mp_group = parallel_state.get_model_parallel_group()
        if dist.get_world_size(mp_group) > 1:
            dist.broadcast(value, src=dist.get_global_rank(mp_group, 0), group=mp_group)
        return int(value.item())

    def score(self, tag: str, candidates: Sequence[object], keys: Sequence[str],
              known: dict[str, float] | None = None, on_score: Callable[[int, float], None] | None = None) -> list[float]:
        """Scores of ``candidates`` (``keys`` identify them; ``known`` scores are reused), the
        same list on every rank. A score is what ``score_fn`` returns: a float or a list of
        floats. ``tag`` must be unique per call within one launch."""
        known = known or {}
        count = len(candidates)
        while True:
            index = self.store.add(f"{tag}/next", 1) - 1 if self.is_leader else -1
            index = self._share_index(index)
            if index >= count:
                break
            key = keys[index]
            if key in known:
                value, computed = known[key], False
            else:
                value, computed = self.score_fn(candidates[index]), True
            if self.is_leader:
                self.store.set(f"{tag}/score/{index}", json.dumps({"score": value, "worker": self.worker}))
                if computed:
                    self.scored_here += 1
                    self._log(tag, key, value)
                if on_score is not None:
                    on_score(index, value)
        return self._collect(tag, count)

    def _collect(self, tag: str, count: int) -> list[float]:
        names = [f"{tag}/score/{i}" for i in range(count)]
        try:
            self.store.wait(names, self.timeout)
        except Exception as error:  # the store raises a plain RuntimeError/DistStoreError on timeout
            missing = [n for n in names if not self.store.check([n])]
            raise WorkerLost(
                f"{len(missing)} of {count} candidates of {tag} got no score within {self.timeout_s:g} s "
                f"(a worker died or hangs). Everything scored so far is saved; rerun with --resume."
            ) from error
        return [json.loads(self.store.get(n))["score"] for n in names]

    def _log(self, tag: str, key: str, value: float) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a+") as log:
            if log.tell() > 0:  # a line cut by a kill: start on a line of our own
                log.seek(log.tell() - 1)
                if log.read(1) != "\n":
                    log.write("\n")
            log.write(json.dumps({"tag": tag, "key": key, "score": _finite_or_none(value)}) + "\n")
            log.flush()
