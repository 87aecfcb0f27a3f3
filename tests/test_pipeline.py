"""``longrope2 pipeline``: the config wiring (fast), and the tiny pipeline end to end under
torchrun on 2 CPU ranks, uninterrupted vs killed between two stages and inside the train stage
and resumed (the same exported weights and eval results)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from longrope2.pipeline import PipelineConfig, build_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"


def _config(tmp_path: Path, edit=None, name: str = "p.yaml") -> Path:
    values = yaml.safe_load(TINY.read_text())
    values["output_dir"] = str(tmp_path / "out")
    if edit is not None:
        edit(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_plan_wires_every_stage(tmp_path):
    """Each run loads the pre-trained weights, takes the search's best.json, reads the prepared
    datasets; each eval reads the export of its run; the base eval has the searched factors."""
    plan = build_plan(PipelineConfig.from_yaml(_config(tmp_path)))
    out = tmp_path / "out"
    assert plan.stages == ["prepare", "pretrain", "search", "train", "export", "eval"]
    assert list(plan.prepare) == ["pretrain", "train"]
    assert plan.prepare["train"].tokenizer == plan.prepare["pretrain"].tokenizer == str(out / "prepare" / "tokenizer")
    assert plan.pretrain.rope is None and plan.pretrain.data.paths == [str(out / "prepare" / "pretrain")]
    assert plan.search.checkpoint == str(out / "pretrain" / "hf")
    assert sorted(plan.runs) == ["long_only", "mixed"]
    for name, run in plan.runs.items():
        assert run.load == str(out / "pretrain" / "checkpoints")
        assert run.output_dir == str(out / "train" / name)
        assert run.rope.factors == str(out / "search" / "best.json") and run.rope.target_length == 1024
        assert run.data.paths == [str(out / "prepare" / "train"), str(out / "prepare" / "pretrain")]
        assert run.model == "tiny"
    assert plan.runs["long_only"].data.short_fraction == 0.0 and plan.runs["mixed"].data.short_fraction == 0.25
    assert plan.evals["base"].ropes == ["original", "yarn", f"longrope2={out / 'search' / 'best.json'}"]
    assert plan.evals["mixed"].model == str(out / "export" / "mixed") and plan.evals["mixed"].ropes == ["checkpoint"]


def test_seeds_multiply_the_arms(tmp_path):
    def edit(values):
        values["seeds"] = [1, 2]

    plan = build_plan(PipelineConfig.from_yaml(_config(tmp_path, edit)))
    assert sorted(plan.runs) == ["long_only-seed1", "long_only-seed2", "mixed-seed1", "mixed-seed2"]
    assert plan.runs["mixed-seed2"].seed == 2 and plan.runs["mixed-seed2"].data.seed == 2


@pytest.mark.parametrize("edit,message", [
    (lambda v: v["train"].update(load="x"), "the pipeline sets load itself"),
    (lambda v: v["search"].update(checkpoint="smollm2"), "the pipeline sets checkpoint itself"),
    (lambda v: v["train"].update(typo=1), r"train \(\w+\): unknown keys \['typo'\]"),
    (lambda v: v["arms"].update(base={}), "arm name 'base'"),
    (lambda v: v.update({"import": {"hf": "smollm2"}}), "exactly one of `import`"),
    (lambda v: v["train"]["data"].update(paths=["prepare:nope"]), "no prepare.nope section"),
    (lambda v: v["pretrain"].update(rope={"method": "yarn", "target_length": 1024}), "pretrain.rope must be null"),
    (lambda v: v.pop("search"), "no `rope` and no search stage"),
])
def test_bad_configs_fail_with_one_line(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        build_plan(PipelineConfig.from_yaml(_config(tmp_path, edit)))


def test_cli_reports_bad_yaml_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ntrain: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "longrope2.cli", "pipeline", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"longrope2 pipeline: error: {bad}: not valid YAML: ")
    assert "at line 3" in done.stderr
    assert "Traceback" not in done.stderr


def test_dry_run_prints_every_stage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "longrope2.cli", "pipeline", "--config", str(_config(tmp_path)),
                           "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    heads = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert heads == ["== prepare", "== pretrain", "== search", "== train (mixed)", "== train (long_only)",
                     "== export", "== eval"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


# --- end to end ------------------------------------------------------------------------------------


def _pipeline(config: Path, *args: str, kill_when=None, timeout: float = 900, torchrun: bool = False) -> tuple[int, str]:
    """Run the pipeline in its own session (``torchrun``: under torchrun with 2 ranks, the
    in-process launch); ``kill_when()`` true -> SIGKILL it and every descendant."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    from tests.torchrun import free_port, kill_tree, processes_mentioning, torchrun_command

    values = yaml.safe_load(config.read_text())
    values["master_port"] = free_port()
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    command = torchrun_command(2, str(ROOT / "launch" / "pipeline.py"), "--config", str(config), *args) if torchrun \
        else [sys.executable, "-m", "longrope2.cli", "pipeline", "--config", str(config), *args]
    log = config.with_suffix(".log")  # a file, not a pipe: a full pipe would stall the pipeline
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                kill_tree(proc.pid)  # the pipeline, torchrun and its ranks (in their own sessions)
                proc.wait()
                time.sleep(1)  # SIGKILLed processes are gone once their parents reap them
                left = processes_mentioning(str(config.parent))
                assert not left, f"processes of the killed run still running: {left}"
                return -9, log.read_text()
            if time.time() > deadline:
                kill_tree(proc.pid)
                raise AssertionError(f"pipeline did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    return proc.returncode, log.read_text()


def _logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip())


def _final(out: Path) -> dict:
    """What a pipeline produced: exported weights (bytes), eval metrics, the searched factors."""
    from safetensors.torch import load_file

    result = {"best": json.loads((out / "search" / "best.json").read_text())["long_factor"],
              "comparison": json.loads((out / "eval" / "comparison.json").read_text())}
    for arm in ("mixed", "long_only"):
        weights = load_file(out / "export" / arm / "model.safetensors")
        result[arm] = {k: v.numpy().tobytes() for k, v in sorted(weights.items())}
    return result


@pytest.mark.distributed
def test_tiny_pipeline_resumes_after_kills_to_the_uninterrupted_result(tmp_path):
    """Every stage on the tiny config. The reference runs uninterrupted with the pipeline itself
    under torchrun (2 ranks; distributed stages in-process); a second run, launched the default
    way (torchrun per stage), is SIGKILLed right after the search stage finished (between stages)
    and again inside the train stage (once the first arm has logged step 3 of 12, its step-2
    checkpoint saved; a tiny step takes ~0.2 s, so 12 steps leave room for the kill to land inside
    the arm), and resumed each time: the exported weights of both arms are bit-identical to the
    reference's, and so are every eval metric and the searched factors. A further invocation
    skips every stage."""
    steps = 12

    def longer_arms(values):
        values["train"]["train_steps"] = steps

    (tmp_path / "a").mkdir()
    reference = _config(tmp_path / "a", longer_arms, name="a.yaml")
    code, log = _pipeline(reference, torchrun=True)
    assert code == 0, log[-4000:]
    out_a = tmp_path / "a" / "out"
    assert (out_a / "eval" / "report.md").is_file() and (out_a / "eval" / "comparison.png").is_file()

    (tmp_path / "b").mkdir()
    resumed = _config(tmp_path / "b", longer_arms, name="b.yaml")
    out_b = tmp_path / "b" / "out"
    code, log = _pipeline(resumed, kill_when=lambda: (out_b / "search" / ".done").is_file())
    assert code == -9 and not (out_b / "train" / "mixed" / "metrics.jsonl").exists(), log[-3000:]
    code, log = _pipeline(resumed, kill_when=lambda: _logged_steps(out_b / "train" / "mixed" / "metrics.jsonl") >= 3)
    killed_at = _logged_steps(out_b / "train" / "mixed" / "metrics.jsonl")
    assert code == -9 and 3 <= killed_at < steps, (killed_at, log[-3000:])
    assert "search (best): done, skipped" in log and "pretrain (train): done, skipped" in log
    code, log = _pipeline(resumed)
    assert code == 0, log[-4000:]
    resumed_at = re.search(r"\[ckpt\] resumed from \S+ at step (\d+)", log)
    assert resumed_at and 2 <= int(resumed_at.group(1)) <= killed_at, log[-4000:]  # resumed, not restarted
    assert _final(out_b) == _final(out_a)

    code, log = _pipeline(resumed)
    assert code == 0 and "): running" not in log and log.count("done, skipped") == 13, log[-2000:]


@pytest.mark.distributed
def test_changed_stage_config_after_it_finished_is_refused(tmp_path):
    """Editing a finished stage's section is an error that says how to redo it (no silent reuse).
    Runs only the prepare stage (``--only prepare``), then edits it."""
    config = _config(tmp_path)
    code, log = _pipeline(config, "--only", "prepare")
    assert code == 0, log[-3000:]
    values = yaml.safe_load(config.read_text())
    values["prepare"]["train"]["needle_fraction"] = 0.2
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    code, log = _pipeline(config, "--only", "pretrain")
    assert code == 1
    assert "prepare (train) finished with another config" in log and "--from prepare" in log
