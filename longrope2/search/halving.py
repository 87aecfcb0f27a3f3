"""Successive halving over needle documents: fewer document-forwards for the same best candidate.

Exhaustive scoring (the paper) runs every candidate on every needle document. With ``rungs``
``[r1, r2, ...]`` a generation is scored in stages instead: every new candidate on documents
``[0, r1)``, the survivors on ``[r1, r2)``, ..., the last survivors on the rest. The rule at a
rung ``r``, stated once here and nowhere else:

    A candidate stops at rung ``r`` when its needle-PPL over documents ``[0, r)`` exceeds the
    k-th best needle-PPL over the same documents by more than ``margin`` (relative), where
    ``k`` is the number of parents and the k-th best is taken over the current parents
    (fully scored, so their first ``r`` documents are known) and this generation's candidates
    still alive at ``r``.

Only fully scored candidates can become parents. The comparison is paired (the same documents
for everyone), the rule depends only on scores, never on which worker finished first, so a
resumed or re-parallelised search prunes the same candidates. Each stage is one pool task per
candidate, keyed by the candidate and its document range, so a killed stage re-scores nothing
that was logged and the per-document NLLs are part of the saved state (``SearchState.partial``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence


@dataclass(kw_only=True)
class HalvingConfig:
    rungs: list[int] = field(default_factory=list)
    """Document counts after which a candidate may stop, increasing, each below the number of
    search documents; empty = every candidate on every document (the paper)."""
    margin: float = 0.1
    """How far above the k-th best needle-PPL (relative) a candidate may be and go on."""

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.rungs) or any(a >= b for a, b in zip(self.rungs, self.rungs[1:])):
            raise ValueError(f"halving.rungs must be increasing document counts >= 1, got {self.rungs}")
        if not self.margin >= 0:
            raise ValueError(f"halving.margin must be >= 0, got {self.margin}")

    def check(self, documents: int) -> None:
        if self.rungs and self.rungs[-1] >= documents:
            raise ValueError(f"halving.rungs {self.rungs}: every rung must be below the {documents} search "
                             "documents (needle.documents x len(needle.depths))")


def stages(documents: int, rungs: Sequence[int]) -> list[tuple[int, int]]:
    """Document ranges ``[start, stop)`` scored one after another: ``[0, r1), [r1, r2), ... [rn, D)``."""
    bounds = [0, *rungs, documents]
    return list(zip(bounds, bounds[1:]))


def needle_ppl(nll: Sequence[float], counts: Sequence[int]) -> float:
    """exp(answer NLL / answer tokens) over the documents ``nll`` covers (the first ``len(nll)``)."""
    tokens = sum(counts[: len(nll)])
    total = sum(nll)
    return math.exp(total / tokens) if tokens and math.isfinite(total) else math.inf


def survivors(alive: Sequence[Hashable], partial: dict, parents: Sequence[Hashable], rung: int,
              counts: Sequence[int], k: int, margin: float) -> list:
    """The candidates of ``alive`` that go on past ``rung`` (the rule in the module docstring)."""
    pool = [*parents, *alive]
    if len(pool) <= k:
        return list(alive)
    ppl = {c: needle_ppl(partial[c][:rung], counts) for c in pool}
    kth = sorted(ppl.values())[k - 1]
    return [c for c in alive if ppl[c] <= kth * (1 + margin)]


def score_generation(candidates: Sequence[Hashable], parents: Sequence[Hashable], partial: dict,
                     documents: int, counts: Sequence[int], config: HalvingConfig, k: int,
                     score_stage: Callable[[list, int, int], list[list[float]]]) -> dict:
    """Per-document answer NLL of each candidate: all ``documents`` entries for those that
    survived every rung, fewer for those that stopped. ``partial`` holds the parents' (and is
    read, not changed); ``score_stage(candidates, start, stop)`` returns each candidate's NLLs
    on documents ``[start, stop)``."""
    nll = {c: [] for c in candidates}
    alive = list(candidates)
    for start, stop in stages(documents, config.rungs):
        if start > 0:
            alive = survivors(alive, {**partial, **nll}, parents, start, counts, k, config.margin)
        if not alive:
            break
        for candidate, values in zip(alive, score_stage(alive, start, stop)):
            nll[candidate].extend(values)
    return nll
