"""Scoring generated answers: exact match (passkey, needle-in-a-haystack) and RULER's two
string-match metrics (``RULER/scripts/eval/synthetic/constants.py``), per sample in [0, 1].

RULER reports ``100 * mean`` over samples of:

* ``string_match_all``: the fraction of the references found (case-insensitive substring) in the
  prediction -- NIAH, variable tracking, common/frequent words extraction;
* ``string_match_part``: 1 if any reference is found -- the QA tasks.
"""

from __future__ import annotations

import re
from typing import Sequence

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")
_FIRST_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become spaces; strip."""
    return _NON_PRINTABLE.sub(" ", prediction).strip()


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


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    try:
        return METRICS[metric](prediction, references)
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None
