"""Bad input to every verb ends in one line on stderr that names what is wrong, exit status 2,
and nothing written: each case runs ``longrope2`` in-process in an empty folder (outputs point
inside it) and the folder holds only the case's own input files afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from longrope2.cli import main

GEOMETRY = ["--rope-base", "10000", "--original-length", "4096", "--target-length", "16384"]
TINY_TRAIN = """\
model: tiny
output_dir: out
seq_length: 512
global_batch_size: 4
train_steps: 8
rope: {method: yarn, target_length: 1024}
data: {tokenizer: hashed-words:512}
"""
TINY_SEARCH = """\
model: tiny
tokenizer: hashed-words
target_length: 1024
output_dir: out
"""
TINY_EVAL = """\
model: tiny
output_dir: out
target_length: 1024
ropes: [original]
lengths: [256]
"""
TINY_PIPELINE = """\
output_dir: out
search: {target_length: 1024}
"""

MIX = """\
output: out/mix
tokenizer: hashed-words:512
window: 256
buckets:
  short: {min_tokens: 1, max_tokens: 256}
  long: {min_tokens: 300, max_tokens: 4096}
sources:
  - {name: books, paths: [embedded:emma], budgets: {long: 1000}}
"""

# (id, files to create {name: text}, argv, fragments the one line must contain)
CASES = [
    # --- inspect / factors: the RoPE geometry ---------------------------------------------
    ("inspect-head-dim-zero", {}, ["inspect", "--head-dim", "0", *GEOMETRY], ["head_dim", "0"]),
    ("inspect-head-dim-odd", {}, ["inspect", "--head-dim", "63", *GEOMETRY], ["head_dim", "63", "even"]),
    ("inspect-rope-base-negative", {}, ["inspect", "--head-dim", "64", "--rope-base", "-5", "--original-length",
                                        "4096", "--target-length", "16384"], ["rope_theta", "-5"]),
    ("inspect-rope-base-one", {}, ["inspect", "--head-dim", "64", "--rope-base", "1", "--original-length", "4096",
                                   "--target-length", "16384"], ["rope_theta", "> 1"]),
    ("inspect-rope-base-nan", {}, ["inspect", "--head-dim", "64", "--rope-base", "nan", "--original-length", "4096",
                                   "--target-length", "16384"], ["rope_theta", "nan"]),
    ("inspect-original-zero", {}, ["inspect", "--head-dim", "64", "--rope-base", "10000", "--original-length", "0",
                                   "--target-length", "16384"], ["original", "0"]),
    ("inspect-rotary-percent", {}, ["inspect", "--head-dim", "64", "--rotary-percent", "1.5", *GEOMETRY],
     ["rotary_percent", "1.5"]),
    ("inspect-target-below-window", {}, ["inspect", "tiny", "--target-length", "128"], ["target", "128", "256"]),
    ("inspect-target-zero", {}, ["inspect", "tiny", "--target-length", "0"], ["target", "0"]),
    ("inspect-unknown-preset", {}, ["inspect", "no_such_model", "--target-length", "4096"], ["no_such_model"]),
    ("inspect-missing-config-json", {}, ["inspect", "missing/config.json", "--target-length", "4096"],
     ["missing/config.json", "not found"]),
    ("inspect-model-yaml-syntax", {"model.yaml": "name: x\n  hidden_size: [1,\n"},
     ["inspect", "model.yaml", "--target-length", "4096"], ["model.yaml", "YAML", "line"]),
    ("inspect-config-json-corrupt", {"hf/config.json": "{not json"}, ["inspect", "hf", "--target-length", "4096"],
     ["config.json", "JSON"]),
    ("inspect-config-json-no-theta", {"hf/config.json": json.dumps({"hidden_size": 64, "num_attention_heads": 1,
                                                                   "max_position_embeddings": 256})},
     ["inspect", "hf", "--target-length", "4096"], ["rope_theta"]),
    ("inspect-model-and-flags", {}, ["inspect", "tiny", "--head-dim", "64", "--target-length", "1024"], ["not both"]),
    ("inspect-partial-flags", {}, ["inspect", "--head-dim", "64", "--target-length", "1024"], ["--rope-base"]),
    ("inspect-head-dim-not-int", {}, ["inspect", "--head-dim", "abc", *GEOMETRY], ["--head-dim", "abc"]),
    ("inspect-no-target", {}, ["inspect", "tiny"], ["--target-length"]),
    ("factors-longrope2-without-dims", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2"],
     ["--critical-dim"]),
    ("factors-critical-dim-range", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                                        "--critical-dim", "100", "--upper-factors", "[4]"], ["critical_dim", "100"]),
    ("factors-upper-not-json", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                                    "--critical-dim", "4", "--upper-factors", "[4, 4"], ["--upper-factors", "JSON"]),
    ("factors-upper-count", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                                 "--critical-dim", "4", "--upper-factors", "[4, 4]"], ["upper", "2"]),
    ("factors-upper-below-scale", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                                       "--critical-dim", "4", "--upper-factors", "[1, 1, 1, 1]"], ["[4, 8]"]),
    ("factors-upper-decreasing", {}, ["factors", "tiny", "--target-length", "1024", "--method", "longrope2",
                                      "--critical-dim", "4", "--upper-factors", "[4, 6, 5, 8]"], ["non-decreasing"]),
    ("factors-upper-file-dict", {"f.json": json.dumps({"something": 1})},
     ["factors", "tiny", "--target-length", "1024", "--method", "longrope2", "--critical-dim", "12",
      "--upper-factors", "f.json"], ["f.json", "factors"]),
    ("factors-unknown-method", {}, ["factors", "tiny", "--target-length", "1024", "--method", "rope9"],
     ["--method", "rope9"]),
    ("factors-attention-negative", {}, ["factors", "tiny", "--target-length", "1024", "--method", "yarn",
                                        "--attention-factor", "-1"], ["attention_factor", "-1"]),
    # --- search -------------------------------------------------------------------------------
    ("search-missing-config", {}, ["search", "--config", "nope.yaml"], ["nope.yaml", "not found"]),
    ("search-yaml-syntax", {"s.yaml": "model: tiny\nneedle: {documents: 2\n"}, ["search", "--config", "s.yaml"],
     ["s.yaml", "YAML", "line"]),
    ("search-not-a-mapping", {"s.yaml": "- model\n- tiny\n"}, ["search", "--config", "s.yaml"],
     ["s.yaml", "mapping"]),
    ("search-unknown-key", {"s.yaml": TINY_SEARCH + "populaton: 4\n"}, ["search", "--config", "s.yaml"],
     ["populaton"]),
    ("search-unknown-baseline", {"s.yaml": TINY_SEARCH + "baselines: [original, rope9]\n"},
     ["search", "--config", "s.yaml"], ["rope9"]),
    ("search-target-below-window", {"s.yaml": TINY_SEARCH.replace("1024", "128")}, ["search", "--config", "s.yaml"],
     ["target", "128", "256"]),
    ("search-bad-dtype", {"s.yaml": TINY_SEARCH + "dtype: float64\n"}, ["search", "--config", "s.yaml"],
     ["dtype", "float64"]),
    ("search-missing-checkpoint", {"s.yaml": TINY_SEARCH.replace("model: tiny", "checkpoint: no/such/folder")},
     ["search", "--config", "s.yaml"], ["no/such/folder"]),
    ("search-population-type", {"s.yaml": TINY_SEARCH + "evolution: {population_size: many}\n"},
     ["search", "--config", "s.yaml"], ["population_size", "many"]),
    # --- prepare-data -------------------------------------------------------------------------
    ("prepare-missing-input", {}, ["prepare-data", "no_such_book.txt", "--output", "out/data",
                                   "--tokenizer", "hashed-words:512"], ["no_such_book.txt"]),
    ("prepare-bad-tokenizer", {"book.txt": "words " * 100}, ["prepare-data", "book.txt", "--output", "out/data",
                                                            "--tokenizer", "hashed-words:lots"], ["hashed-words:lots"]),
    ("prepare-needle-fraction", {"book.txt": "words " * 100},
     ["prepare-data", "book.txt", "--output", "out/data", "--tokenizer", "hashed-words:512", "--needle-fraction",
      "1.5"], ["needle_fraction", "1.5"]),
    ("prepare-doc-lengths", {"book.txt": "words " * 100},
     ["prepare-data", "book.txt", "--output", "out/data", "--tokenizer", "hashed-words:512", "--min-doc-tokens",
      "512", "--max-doc-tokens", "64"], ["min_doc_tokens", "512", "64"]),
    ("prepare-unknown-embedded", {}, ["prepare-data", "embedded:no_such_book", "--output", "out/data",
                                      "--tokenizer", "hashed-words:512"], ["no_such_book"]),
    ("prepare-no-output", {"book.txt": "words " * 100}, ["prepare-data", "book.txt", "--tokenizer", "hashed-words:8"],
     ["--output", "--config"]),
    ("mix-overlapping-buckets", {"m.yaml": MIX.replace("min_tokens: 300", "min_tokens: 200")},
     ["prepare-data", "--config", "m.yaml"], ["short", "long", "overlap"]),
    ("mix-unknown-bucket", {"m.yaml": MIX.replace("{long: 1000}", "{medium: 1000}")},
     ["prepare-data", "--config", "m.yaml"], ["books", "medium"]),
    ("mix-missing-file", {"m.yaml": MIX.replace("embedded:emma", "no/such/*.jsonl")},
     ["prepare-data", "--config", "m.yaml"], ["books", "no/such/*.jsonl"]),
    ("mix-with-inputs", {"m.yaml": MIX}, ["prepare-data", "--config", "m.yaml", "book.txt"], ["--config", "inputs"]),
    # --- train --------------------------------------------------------------------------------
    ("train-missing-config", {}, ["train", "--config", "nope.yaml"], ["nope.yaml", "not found"]),
    ("train-yaml-syntax", {"t.yaml": TINY_TRAIN + "optim: {lr: [1\n"}, ["train", "--config", "t.yaml"],
     ["t.yaml", "YAML", "line"]),
    ("train-unknown-key", {"t.yaml": TINY_TRAIN + "train_step: 3\n"}, ["train", "--config", "t.yaml"], ["train_step"]),
    ("train-layout-does-not-divide", {"t.yaml": TINY_TRAIN + "parallel: {tp: 3}\n"}, ["train", "--config", "t.yaml"],
     ["tp", "3"]),
    ("train-negative-steps", {"t.yaml": TINY_TRAIN.replace("train_steps: 8", "train_steps: -1")},
     ["train", "--config", "t.yaml"], ["train_steps", "-1"]),
    ("train-short-fraction", {"t.yaml": TINY_TRAIN.replace("hashed-words:512}", "hashed-words:512, "
                                                                               "short_fraction: 2.0}")},
     ["train", "--config", "t.yaml"], ["short_fraction", "2.0"]),
    ("train-unknown-rope-method", {"t.yaml": TINY_TRAIN.replace("method: yarn", "method: rope9")},
     ["train", "--config", "t.yaml"], ["rope9"]),
    ("train-seq-length-above-target", {"t.yaml": TINY_TRAIN.replace("seq_length: 512", "seq_length: 4096")},
     ["train", "--config", "t.yaml"], ["seq_length", "4096", "1024"]),
    # --- convert ------------------------------------------------------------------------------
    ("import-missing-hf", {}, ["convert", "import-hf", "--hf", "no/such/hf", "--output", "out"], ["no/such/hf"]),
    ("import-hf-without-weights", {"hf/config.json": "{}"}, ["convert", "import-hf", "--hf", "hf", "--output", "out"],
     ["hf"]),
    ("import-tp-world-mismatch", {}, ["convert", "import-hf", "--hf", "smollm2", "--output", "out", "--tp", "2"],
     ["--tp", "2"]),
    ("export-missing-checkpoint", {}, ["convert", "export-hf", "--checkpoint", "no/such/ckpt", "--output", "out"],
     ["no/such/ckpt"]),
    ("export-corrupt-checkpoint", {"ckpt/metadata.json": "{broken"},
     ["convert", "export-hf", "--checkpoint", "ckpt", "--output", "out", "--model", "tiny"], ["ckpt"]),
    ("export-bad-rope-file", {"ckpt/metadata.json": "{}", "rope.json": json.dumps({"nothing": []})},
     ["convert", "export-hf", "--checkpoint", "ckpt", "--output", "out", "--model", "tiny", "--rope", "rope.json"],
     ["rope.json"]),
    # --- eval ---------------------------------------------------------------------------------
    ("eval-missing-config", {}, ["eval", "--config", "nope.yaml"], ["nope.yaml", "not found"]),
    ("eval-lengths-not-int", {"e.yaml": TINY_EVAL}, ["eval", "--config", "e.yaml", "--lengths", "4k"],
     ["--lengths", "4k"]),
    ("eval-unknown-rope", {"e.yaml": TINY_EVAL}, ["eval", "--config", "e.yaml", "--ropes", "original,rope9"],
     ["rope9"]),
    ("eval-unknown-key", {"e.yaml": TINY_EVAL + "sample: 3\n"}, ["eval", "--config", "e.yaml"], ["sample"]),
    ("eval-yaml-syntax", {"e.yaml": TINY_EVAL + "lengths: [256\n"}, ["eval", "--config", "e.yaml"],
     ["e.yaml", "YAML", "line"]),
    ("eval-missing-model", {"e.yaml": TINY_EVAL.replace("model: tiny", "model: no/such/model")},
     ["eval", "--config", "e.yaml"], ["no/such/model"]),
    ("eval-missing-rope-file", {"e.yaml": TINY_EVAL}, ["eval", "--config", "e.yaml", "--ropes",
                                                      "longrope2=no/best.json"], ["no/best.json"]),
    # --- pipeline -----------------------------------------------------------------------------
    ("pipeline-missing-config", {}, ["pipeline", "--config", "nope.yaml"], ["nope.yaml", "not found"]),
    ("pipeline-yaml-syntax", {"p.yaml": TINY_PIPELINE + "train: {seq_length: [1\n"}, ["pipeline", "--config", "p.yaml"],
     ["p.yaml", "YAML", "line"]),
    ("pipeline-unknown-stage", {"p.yaml": TINY_PIPELINE}, ["pipeline", "--config", "p.yaml", "--only", "polish"],
     ["polish"]),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("files, argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, files, argv, fragments):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr: {captured.err}"
    assert len(lines) == 1, f"expected one line, got:\n{captured.err}"
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _tree(tmp_path) == before, "a failed command wrote files"


def test_the_table_covers_every_verb_and_forty_cases():
    verbs = {argv[0] if argv[0] != "convert" else f"convert {argv[1]}" for _, _, argv, _ in CASES}
    assert verbs == {"inspect", "factors", "search", "prepare-data", "train", "convert import-hf",
                     "convert export-hf", "eval", "pipeline"}
    assert len(CASES) >= 40


def test_the_installed_entry_point_prints_one_line_and_can_show_the_traceback(tmp_path):
    """The same through a new interpreter (``python -m longrope2.cli``); with
    ``LONGROPE2_TRACEBACK=1`` the traceback is shown instead, for bug reports."""
    argv = [sys.executable, "-m", "longrope2.cli", "inspect", "--head-dim", "64", "--rope-base", "-5",
            "--original-length", "4096", "--target-length", "16384"]
    env = {k: v for k, v in os.environ.items() if k != "LONGROPE2_TRACEBACK"}
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("longrope2 inspect: error: rope_theta (the RoPE base) must be a finite number > 1, "
                           "got -5\n")
    traced = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env={**env, "LONGROPE2_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "rope_theta" in traced.stderr
