"""The search end to end under torchrun on CPU: 2 workers give exactly the 1-process result,
and a search killed mid-way and resumed ends identical to an uninterrupted one without
re-scoring anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from torchrun import run_torchrun, torchrun_command, torchrun_env

pytestmark = pytest.mark.distributed

LAUNCH = str(Path(__file__).resolve().parents[1] / "launch" / "search.py")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The tiny search with larger random weights (std 0.3) so candidates really differ."""
    root = tmp_path_factory.mktemp("search")
    model = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/models/tiny.yaml").read_text())
    model["init_method_std"] = 0.3
    (root / "model.yaml").write_text(yaml.safe_dump(model))
    values = {
        "model": str(root / "model.yaml"), "tokenizer": "hashed-words", "target_length": 1024,
        "output_dir": str(root / "unused"),
        "needle": {"documents": 2, "heldout_documents": 1, "heldout_depths": [0.5]},
        "evolution": {"population_size": 8, "iterations": 4, "parents": 4, "mutants": 3, "crossovers": 3},
    }
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(values))
    return root, path


@pytest.fixture(scope="module")
def halving_config(config):
    """The same search on 4 documents with successive halving after the first and second."""
    root, path = config
    values = yaml.safe_load(path.read_text())
    values["needle"]["documents"] = 4
    values["halving"] = {"rungs": [1, 2], "margin": 0.05}
    halving = root / "halving.yaml"
    halving.write_text(yaml.safe_dump(values))
    return root, halving


def _search(config, name, nproc, *extra):
    root, path = config
    out = root / name
    proc = run_torchrun(nproc, LAUNCH, "--config", str(path), "--output-dir", str(out), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _logged_keys(out: Path) -> list[str]:
    keys = []
    for log in out.glob("scores.worker*.jsonl"):
        for line in log.read_text().splitlines():
            try:
                keys.append(json.loads(line)["key"])
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return keys


@pytest.fixture(scope="module")
def single(config):
    return _search(config, "one-process", 1)


def test_two_workers_match_one_process(config, single):
    double = _search(config, "two-workers", 2)
    one, two = (json.loads((d / "state.json").read_text()) for d in (single, double))
    assert one == two  # every candidate, score, generation and RNG state
    best_one, best_two = (json.loads((d / "best.json").read_text()) for d in (single, double))
    assert best_one["long_factor"] == best_two["long_factor"]
    assert best_one["needle_ppl"] == best_two["needle_ppl"]
    # both workers took candidates, and nothing was scored twice
    keys = _logged_keys(double)
    assert len(keys) == len(set(keys)) == len(one["scored"]) + 4  # + the 4 baselines
    assert best_one["heldout"] == best_two["heldout"]
    assert all((double / f"scores.worker{w}.jsonl").stat().st_size > 0 for w in (0, 1))


def test_outputs_are_complete_and_consistent(single):
    best = json.loads((single / "best.json").read_text())
    state = json.loads((single / "state.json").read_text())
    assert best["needle_ppl"] == min(entry["score"] for entry in state["scored"])
    assert set(best["baselines_needle_ppl"]) == {"original", "pi", "ntk", "yarn"}
    rope = json.loads((single / "rope_config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == best["long_factor"]
    assert rope["attention_factor"] == pytest.approx(best["attention_factor"])
    assert (single / "search.png").stat().st_size > 10_000
    rows = (single / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + len(state["scored"])
    comparison = (single / "comparison.md").read_text()
    assert "LongRoPE2 (searched" in comparison
    # held-out numbers first: the best and every baseline, on documents the search never saw
    held = best["heldout"]
    assert set(held["needle_ppl"]) == {"longrope2", "original", "pi", "ntk", "yarn"}
    assert held["documents"] == 1 and held["depths"] == [0.5]
    assert "| rope | held-out needle-PPL (1 documents, depths 0.5) | search needle-PPL (2 documents) |" in comparison
    assert f"**{held['needle_ppl']['longrope2']:.4f}**" in comparison
    assert len((single / "heldout.worker0.jsonl").read_text().splitlines()) == 5


def test_heldout_documents_are_other_books_seeds_and_depths():
    from longrope2.configs import from_dict
    from longrope2.data.tokenize import hashed_words
    from longrope2.search.run import SearchConfig, needle_documents

    config = from_dict(SearchConfig, {"model": "tiny", "tokenizer": "hashed-words", "target_length": 1024,
                                      "output_dir": "unused", "needle": {"documents": 2, "heldout_documents": 2,
                                                                         "heldout_depths": [0.25, 0.5]}})
    tokenizer = hashed_words(512)
    search, held = needle_documents(config, tokenizer), needle_documents(config, tokenizer, heldout=True)
    assert len(search) == 2 and len(held) == 4
    assert {d.source for d in search}.isdisjoint(d.source for d in held)
    assert {d.depth for d in search} == {0.0} and {d.depth for d in held} == {0.25, 0.5}
    assert all(h.tokens != d.tokens for h in held for d in search)


def _kill_and_resume(config, single, name):
    root, path = config
    out = root / name
    proc = subprocess.Popen(torchrun_command(2, LAUNCH, "--config", str(path), "--output-dir", str(out)),
                            env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    state = out / "state.json"
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("generation", 0) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["generation"]
    assert 2 <= killed_at <= 4
    before = _logged_keys(out)

    with pytest.raises(AssertionError, match="exists: pass --resume"):
        _search(config, name, 1)
    _search(config, name, 1, "--resume")
    assert json.loads(state.read_text()) == json.loads((single / "state.json").read_text())
    after = _logged_keys(out)
    assert set(before) < set(after)
    assert len(after) == len(set(after))  # nothing scored twice across the kill


def test_killed_search_resumes_to_the_same_result(config, single):
    _kill_and_resume(config, single, "killed")


@pytest.fixture(scope="module")
def halving_single(halving_config):
    return _search(halving_config, "halving-one-process", 1)


def test_halving_two_workers_match_one_process_with_fewer_forwards(halving_config, halving_single):
    """Successive halving: 2 workers prune exactly the candidates 1 process prunes; some stop
    after one or two of the 4 documents, so the search costs fewer document-forwards than
    every candidate on every document; only fully scored candidates can be the best."""
    double = _search(halving_config, "halving-two-workers", 2)
    one, two = (json.loads((d / "state.json").read_text()) for d in (halving_single, double))
    assert one == two
    best = json.loads((halving_single / "best.json").read_text())
    reached = [len(entry["nll"]) for entry in one["partial"]]
    assert set(reached) <= {1, 2, 4} and 1 in reached and 4 in reached
    assert best["stopped_early"] == sum(r < 4 for r in reached) == len(one["partial"]) - len(one["scored"]) > 0
    exhaustive = (4 + len(one["partial"])) * 4 + 5 * 1  # baselines and candidates on 4 documents, held-out
    assert best["document_forwards"] == 4 * 4 + sum(reached) + 5 < exhaustive
    assert best["needle_ppl"] == min(entry["score"] for entry in one["scored"])
    keys = _logged_keys(double)
    assert len(keys) == len(set(keys))  # each (candidate, document range) scored once
    rows = (halving_single / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + len(one["partial"])
    assert "stopped early by successive halving" in (halving_single / "comparison.md").read_text()


def test_killed_halving_search_resumes_to_the_same_result(halving_config, halving_single):
    """Killed while generations are scored in halving stages: --resume re-scores no logged
    (candidate, document range) and ends on the uninterrupted state, per-document NLLs included."""
    _kill_and_resume(halving_config, halving_single, "halving-killed")


def test_resume_inside_the_first_generation(config, single):
    """Stopped before any state.json (Slurm preempting the first generation), with the last
    score line cut mid-write: --resume restarts from the logged scores, scores only the rest,
    and ends identical."""
    root, _ = config
    out = root / "first-generation"
    out.mkdir()
    logged = (single / "scores.worker0.jsonl").read_text().splitlines()
    kept = logged[:6]  # the 4 baselines and 2 of the initial population
    (out / "scores.worker0.jsonl").write_text("\n".join(kept) + "\n" + logged[6][:25])
    _search(config, "first-generation", 1, "--resume")
    assert json.loads((out / "state.json").read_text()) == json.loads((single / "state.json").read_text())
    after = _logged_keys(out)
    assert after[:6] == [json.loads(line)["key"] for line in kept]
    assert len(after) == len(set(after)) == len(_logged_keys(single))  # the 6 were not scored again


def test_resume_on_other_documents_is_refused_in_one_line(config, single):
    """Score keys name the rope and the document range only: a --resume whose needle documents
    differ from those the logged scores were computed on (here another needle seed) stops with
    one line naming what changed, before any score is reused; the same config resumes."""
    import shutil

    root, path = config
    out = root / "other-documents"
    shutil.copytree(single, out)
    values = yaml.safe_load(path.read_text())
    values["needle"]["seed"] = 7
    (root / "other-seed.yaml").write_text(yaml.safe_dump(values))
    proc = run_torchrun(1, LAUNCH, "--config", str(root / "other-seed.yaml"), "--output-dir", str(out), "--resume")
    assert proc.returncode != 0
    assert f"longrope2 search: error: {out} holds scores computed with other documents (see scored_on.json)" \
        in proc.stderr
    assert json.loads((out / "scored_on.json").read_text()) == json.loads((single / "scored_on.json").read_text())
    _search(config, "other-documents", 1, "--resume")  # its own config: the search is complete, nothing changes
    assert json.loads((out / "state.json").read_text()) == json.loads((single / "state.json").read_text())


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs/search").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_search_preset_loads(path):
    from longrope2.search.run import SearchConfig

    cfg = SearchConfig.from_yaml(path)
    assert cfg.target_length > 0 and cfg.output_dir


def test_file_baselines_keep_short_factors_and_attention_factor(tmp_path):
    """``file:`` baselines go through ``RopeScaling.from_file``: an HF ``config.json`` keeps its
    short factors and attention factor, a ``best.json`` its long factors; scored at the
    search's target length."""
    from longrope2.model.config import ModelConfig
    from longrope2.rope import RopeScaling
    from longrope2.search.run import SearchConfig, baseline_scalings

    model = ModelConfig.from_name("tiny")
    yarn = RopeScaling.from_method("yarn", model.rope_geometry, 1024)
    short = [1.0 + 0.01 * i for i in range(model.rotary_dim // 2)]
    hf = RopeScaling.from_factors(model.rope_geometry, 1024, list(yarn.long_factor), short, attention_factor=1.3)
    (tmp_path / "config.json").write_text(json.dumps(hf.to_hf_config()))
    (tmp_path / "best.json").write_text(json.dumps({"long_factor": list(yarn.long_factor), "target_length": 1024,
                                                    "original_length": model.original_max_position_embeddings}))
    config = SearchConfig(model="tiny", tokenizer="hashed-words", target_length=1024, output_dir=str(tmp_path / "o"),
                          baselines=["original", f"file:{tmp_path / 'config.json'}", f"file:{tmp_path / 'best.json'}"])
    baselines = baseline_scalings(config, model)
    assert baselines["original"] is None
    assert baselines["config"].short_factor == tuple(short)
    assert baselines["config"].resolved_attention_factor == 1.3
    assert baselines["best"].long_factor == yarn.long_factor
    assert baselines["best"].max_position_embeddings == 1024
