"""``longrope2 inspect`` / ``factors`` as a user runs them."""

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longrope2.cli import main
from longrope2.rope import RopeGeometry, RopeScaling


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, tcd, d10",
    [
        (["--head-dim", "128", "--rope-base", "500000", "--original-length", "8192", "--target-length", "131072"], 35, 24),
        (["--head-dim", "96", "--rope-base", "10000", "--original-length", "2048", "--target-length", "131072"], 31, 19),
        (["llama3_8b", "--target-length", "131072"], 35, 24),
        (["phi3_mini", "--target-length", "131072"], 31, 19),
    ],
)
def test_inspect_reports_paper_critical_dims(capsys, argv, tcd, d10):
    report = _run_json(capsys, ["inspect", *argv, "--json"])
    assert report["theoretical_critical_dim"] == tcd
    assert report["ten_period_dim"] == d10
    assert report["under_trained_pairs"][0] == tcd
    assert len(report["pairs"]) == report["rotary_dim"] // 2
    assert set(report["factors"]) == {"pi", "ntk", "yarn", "longrope2"}
    assert report["factors"]["longrope2"][tcd:] == [report["scale"]] * (report["rotary_dim"] // 2 - tcd)


def test_inspect_reads_hf_config_json_with_partial_rotary(tmp_path, capsys):
    # a Phi-4-mini-like config.json: 128-channel heads, 75% rotated
    config = {"hidden_size": 3072, "num_attention_heads": 24, "partial_rotary_factor": 0.75,
              "rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = _run_json(capsys, ["inspect", str(tmp_path), "--target-length", "131072", "--json"])
    assert report["rotary_dim"] == 96 and report["original_length"] == 4096
    assert len(report["pairs"]) == 48


def test_inspect_plot_and_table(tmp_path, capsys):
    plot = tmp_path / "rope.png"
    assert main(["inspect", "smollm2_135m", "--target-length", "32768", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "d_tcd = 20" in out and "d10 = 14" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_factors_hf_output_loads_in_transformers(capsys, style):
    fields = _run_json(capsys, ["factors", "smollm2_135m", "--target-length", "32768", "--method", "yarn",
                                "--style", style])
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, **fields)
    inv, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=32768)
    expected = RopeScaling.from_method("yarn", RopeGeometry(64, 1e5, 8192), 32768)
    assert torch.equal(inv, expected.long_inv_freq)
    assert attention == pytest.approx(expected.resolved_attention_factor)


def test_factors_longrope2_from_searched_list(capsys):
    out = _run_json(capsys, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                             "--critical-dim", "4", "--upper-factors", "[4, 4.5, 5, 8]", "--format", "json"])
    assert out["long_factor"][4:] == [4, 4.5, 5, 8]
    assert out["long_factor"][:4] == pytest.approx([4 ** (i / 4) for i in range(4)])
