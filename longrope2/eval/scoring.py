"""Scoring generated answers: exact match (passkey, needle-in-a-haystack) and RULER's two
string-match metrics (``RULER/scripts/eval/synthetic/constants.py``), per sample in [0, 1].

RULER reports ``100 * mean`` over samples of:

* ``string_match_all``: the fraction of the references found (case-insensitive substring) in the
  prediction -- NIAH, variable tracking, common/frequent words extraction;
* ``string_match_part``: 1 if any reference is found -- the QA tasks.

and 95% intervals per cell, so that a cell of few samples reads as what it is.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")
_FIRST_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred`` (``scripts/eval/evaluate.py``): strip, control characters become
    newlines, strip again."""
    return _NON_PRINTABLE.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    prediction = postprocess(prediction).lower()
    return sum(ref.lower() in prediction for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    prediction = postprocess(prediction).lower()
    return float(any(ref.lower() in prediction for ref in references))


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 if the first word of the prediction (letters/digits, hyphens inside) is the reference:
    `` 4821936.`` matches ``4821936``; ``48219360`` and ``the number is 4821936`` do not."""
    if len(references) != 1:
        raise ValueError(f"exact_match takes one reference, got {len(references)}")
    found = _FIRST_WORD.search(postprocess(prediction))
    return float(found is not None and found.group(0) == references[0])


METRICS = {"exact": exact_match, "all": string_match_all, "part": string_match_part}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a binomial proportion, in [0, 1]."""
    if n < 1:
        raise ValueError("an interval needs at least one sample")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(groups: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups of each group's mean (one group: a
    plain mean; several: RULER's average over tasks, each task resampled on its own)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("a bootstrap interval needs samples in every group")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for g in groups:
        values = np.asarray(g, dtype=float)
        means += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    means /= len(groups)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def interval(scores: Sequence[float]) -> tuple[float, float]:
    """95% interval of a cell's mean score: Wilson when every sample scored 0 or 1 (a binomial
    count), else a bootstrap (string_match_all gives partial credit)."""
    if all(s in (0.0, 1.0) for s in scores):
        return wilson_interval(sum(scores), len(scores))
    return bootstrap_interval([scores])


def average_interval(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
    """95% interval of the mean of group means (RULER's average over tasks): Wilson on the pooled
    samples when every score is 0 or 1 (a bootstrap has no width at 0% or 100%), else the
    bootstrap that resamples each group on its own."""
    if all(s in (0.0, 1.0) for g in groups for s in g):
        n = sum(len(g) for g in groups)
        return wilson_interval(sum(sum(g) / len(g) for g in groups) / len(groups) * n, n)
    return bootstrap_interval(groups)


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    try:
        return METRICS[metric](prediction, references)
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None
