"""A scoring worker spanning TP=2, PP=2, CP=2 or PP=2 x CP=2 gives the single-rank needle-PPL."""

import json
from pathlib import Path

import pytest
from torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_worker_spanning_ranks_scores_like_one_rank(tmp_path):
    out = tmp_path / "scores.json"
    proc = run_torchrun(2, str(Path(__file__).parent / "distributed" / "scorer_worker.py"), "--out", str(out),
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    reference = result["reference"]
    assert len(set(reference)) == 3  # original, PI and YaRN really differ
    for layout in ("tp2", "pp2", "cp2"):
        for ours, ref in zip(result[layout], reference):
            assert ours == pytest.approx(ref, rel=1e-5), (layout, result[layout], reference)


def test_worker_spanning_pp2_and_cp2_scores_like_one_rank(tmp_path):
    """4 ranks, pipeline and context parallel together: megatron's forward-only schedule divides
    the sequence length by CP itself, so the scorer passes the full length (a CP-divided one
    gave pipeline buffers half the activations' size)."""
    out = tmp_path / "scores.json"
    proc = run_torchrun(4, str(Path(__file__).parent / "distributed" / "scorer_worker.py"), "--out", str(out),
                        "--layouts", "pp2cp2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for ours, ref in zip(result["pp2cp2"], result["reference"], strict=True):
        assert ours == pytest.approx(ref, rel=1e-5), (result["pp2cp2"], result["reference"])
