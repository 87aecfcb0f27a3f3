"""The paper's direction on the real SmolLM2-135M (8k window) with the searched 16k factors:
needle-driven PPL at 16k far below the original RoPE's, and the same as the original at 4k.
About 10 minutes on 2 CPU cores (one needle document per cell)."""

from pathlib import Path

import pytest

from longrope2 import configs
from longrope2.eval.config import EvalConfig
from longrope2.eval.run import run_eval

BEST = Path(__file__).resolve().parents[1] / "results" / "smollm2_16k_h100" / "best.json"


@pytest.mark.slow
def test_longrope2_beats_original_at_16k_and_keeps_4k(tmp_path):
    config = configs.from_dict(EvalConfig, {
        "model": "smollm2", "output_dir": str(tmp_path), "target_length": 16384,
        "ropes": ["original", f"longrope2={BEST}"], "lengths": [4096, 16384], "needle_ppl": {"samples": 1}})
    ppl = run_eval(config, progress=False)["metrics"]["needle_ppl"]
    original, searched = ppl["original"], ppl["longrope2"]
    assert searched["16384"]["ppl"] < original["16384"]["ppl"] / 5
    assert searched["4096"]["ppl"] == pytest.approx(original["4096"]["ppl"], rel=0.1)
