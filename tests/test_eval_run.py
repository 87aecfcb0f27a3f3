"""``longrope2 eval`` end to end on a tiny random HF model: report files, resume without
recomputing, a crash mid-run, config strictness and the CLI verb."""

import json

import pytest
import yaml

from eval_fixtures import TARGET, save_tiny, write_books
from longrope2 import configs
from longrope2.cli import main
from longrope2.eval import run as eval_run
from longrope2.eval.config import EvalConfig


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return str(save_tiny(root / "model")), write_books(root / "books")


class Crash(Exception):
    pass


def _config(assets, out, **extra):
    model, books = assets
    values = dict(model=model, output_dir=str(out), ropes=["original", "yarn"], target_length=TARGET,
                  lengths=[512, 1024], books=books,
                  needle_ppl={"samples": 1}, book_ppl={"samples": 1, "last_tokens": 32},
                  passkey={"samples": 1, "max_new_tokens": 4},
                  needle={"samples": 1, "depths": [0.0, 1.0], "max_new_tokens": 4, "lengths": [512]},
                  ruler={"samples": 1, "tasks": ["niah_single_1", "vt", "qa_1"], "lengths": [1024],
                         "max_new_tokens": {"niah_single_1": 4, "vt": 4}},
                  short_context={"samples": 1, "lengths": [128, 256], "last_tokens": 32,
                                 "lm_eval_tasks": ["hellaswag"]})
    values.update(extra)
    return configs.from_dict(EvalConfig, values)


def test_report_written_and_resume_recomputes_nothing(assets, tmp_path, monkeypatch):
    config = _config(assets, tmp_path / "out")
    calls, crashed = [], []
    compute = eval_run.Evaluator.compute

    def counted(self, cell):
        calls.append(cell)
        if len(calls) == 7 and not crashed:
            crashed.append(cell)
            raise Crash  # a crash mid-run
        return compute(self, cell)

    monkeypatch.setattr(eval_run.Evaluator, "compute", counted)
    with pytest.raises(Crash):
        eval_run.run_eval(config, progress=False)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    total = 2 * (2 + 2 + 2 + 2 + 2 + 2)  # ropes x (needle_ppl, book_ppl, passkey, needle, ruler, short) cells
    calls.clear()
    summary = eval_run.run_eval(config, progress=False)
    assert len(calls) == total - 6  # only the cells the crash did not finish
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == total
    for name in ("report.md", "summary.json", "results.jsonl", "meta.json", "scores.png", "needle_heatmap.png"):
        assert (tmp_path / "out" / name).is_file(), name
    metrics = summary["metrics"]
    assert set(metrics) == {"needle_ppl", "book_ppl", "passkey", "needle", "niah_single_1", "vt", "short_ppl"}
    assert summary["skipped"] == ["RULER qa_1 at 1024: skipped: qa_1 needs SQuAD v2 (dev-v2.0.json): set ruler.squad to its path"]
    assert summary["ruler_average"]["yarn"]["1024"]["task_names"] == ["niah_single_1", "vt"]
    assert set(metrics["needle_ppl"]) == {"original", "yarn"}
    assert metrics["book_ppl"]["yarn"]["1024"]["tokens"] == 32
    assert summary["needle_depths"]["yarn"]["512"].keys() == {"0", "1"}
    assert summary["short_ppl_ratio"]["original"] == {"128": 1.0, "256": 1.0}
    assert "not installed" in summary["lm_eval"]["skipped"]
    assert summary["complete"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Needle-driven PPL" in report and "| yarn |" in report and "Skipped: lm_eval" in report
    assert "`yarn` (yarn: yarn (factor 4))" in report and "RULER qa_1 at 1024: skipped:" in report

    calls.clear()
    again = eval_run.run_eval(config, progress=False)
    assert calls == [] and again["metrics"] == metrics

    # one more rope and a longer length: only the new cells are computed
    more = _config(assets, tmp_path / "out", ropes=["original", "yarn", "pi"])
    calls.clear()
    eval_run.run_eval(more, progress=False)
    assert len(calls) == total // 2


def test_config_is_strict_and_other_models_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        _config(assets, tmp_path, passkeys={"samples": 1})
    with pytest.raises(ValueError, match="unknown tasks"):
        _config(assets, tmp_path, ruler={"tasks": ["qa_3"]})
    with pytest.raises(ValueError, match="depths"):
        _config(assets, tmp_path, needle={"samples": 1, "depths": [1.5]})
    (tmp_path / "meta.json").write_text(json.dumps({"model": "another"}))
    with pytest.raises(ValueError, match="other settings"):
        eval_run.run_eval(_config(assets, tmp_path, needle_ppl={"samples": 0}), progress=False)


def test_cli_eval(assets, tmp_path, capsys):
    model, books = assets
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp_path / "out"), "books": books,
                                    "target_length": TARGET, "lengths": [512], "needle_ppl": {"samples": 1}}))
    assert main(["eval", "--config", str(path), "--ropes", "original,ntk"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["metrics"]["needle_ppl"]) == {"original", "ntk"}
    path.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp_path), "bogus": 1}))
    assert main(["eval", "--config", str(path)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_megatron_checkpoint_is_exported_and_evaluated(assets, tmp_path):
    """A megatron dist checkpoint (from `longrope2 convert import-hf`) goes through the converter's
    HF export and gives the HF model's numbers."""
    import subprocess
    import sys

    model, books = assets
    checkpoint = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "longrope2.cli", "convert", "import-hf", "--hf", model, "--output",
                    str(checkpoint)], check=True, capture_output=True)
    hf = eval_run.run_eval(_config(assets, tmp_path / "hf", lengths=[512], needle_ppl={"samples": 1}, **NO_TASKS),
                           progress=False)
    mcore = eval_run.run_eval(_config(assets, tmp_path / "mcore", model=str(checkpoint), lengths=[512],
                                      needle_ppl={"samples": 1}, **NO_TASKS), progress=False)
    assert mcore["metrics"]["needle_ppl"] == hf["metrics"]["needle_ppl"]


NO_TASKS = dict(book_ppl={"samples": 0}, passkey={"samples": 0}, needle={"samples": 0}, ruler={"samples": 0},
                short_context={"samples": 0})
