"""``longrope2 eval`` under torchrun: 2 CPU ranks give the same results.jsonl as 1 rank, and a
rerun with another world size resumes without repeating a cell."""

import json
from pathlib import Path

import yaml

from eval_fixtures import TARGET, save_tiny, write_books
from longrope2 import configs
from longrope2.eval.config import EvalConfig
from longrope2.eval.run import Ranks, run_eval
from torchrun import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds",)  # wall time per sample: the only field that differs between runs


def _values(model: str, books: list[str], out: Path, ropes: list[str]) -> dict:
    return dict(model=model, output_dir=str(out), ropes=ropes, target_length=TARGET, lengths=[512], books=books,
                batch_size=2, needle_ppl={"samples": 2},
                passkey={"samples": 3, "max_new_tokens": 3},
                ruler={"samples": 3, "tasks": ["niah_single_1", "vt"], "lengths": [1024],
                       "max_new_tokens": {"niah_single_1": 3, "vt": 3}})


def _content(out: Path) -> tuple[list[str], list[str]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    keys = [r["key"] for r in records]
    return keys, sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in records)


def _torchrun_eval(config: dict, path: Path):
    path.write_text(yaml.safe_dump(config))
    done = run_torchrun(2, str(ROOT / "launch" / "eval.py"), "--config", str(path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_equal_one_and_resume_across_world_sizes(tmp_path):
    model, books = str(save_tiny(tmp_path / "model")), write_books(tmp_path / "books")
    ropes = ["original", "yarn"]
    single = run_eval(configs.from_dict(EvalConfig, _values(model, books, tmp_path / "one", ropes)), progress=False)
    one_keys, one = _content(tmp_path / "one")
    total = 2 * (2 + 3 + 2 * 3)  # ropes x (needle_ppl, passkey, niah_single_1 + vt) cells
    assert len(one_keys) == total

    _torchrun_eval(_values(model, books, tmp_path / "two", ropes), tmp_path / "two.yaml")
    two_keys, two = _content(tmp_path / "two")
    assert two == one  # the same samples, predictions, scores and NLLs
    assert sorted(two_keys) == sorted(one_keys) and not list((tmp_path / "two").glob("results.rank*"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["metrics"] == single["metrics"] and summary["complete"]

    # 1 rank does one rope, then 2 ranks do both: only the missing cells, none twice
    run_eval(configs.from_dict(EvalConfig, _values(model, books, tmp_path / "resume", ["original"])), progress=False)
    first, _ = _content(tmp_path / "resume")
    assert len(first) == total // 2
    _torchrun_eval(_values(model, books, tmp_path / "resume", ropes), tmp_path / "resume.yaml")
    keys, content = _content(tmp_path / "resume")
    assert len(keys) == len(set(keys)) == total  # no cell computed twice
    assert keys[:len(first)] == first  # the first run's lines kept as they were
    assert content == one


def test_shares_split_what_is_left_evenly_within_each_task():
    """What a partial run left (the first indices of some tasks done) splits into disjoint
    shares that together are exactly what is left, each task's cells within one of even."""
    tasks = ["niah_single_1", "niah_multikey_2", "vt", "cwe", "fwe"]
    done = {f"{t}|fp|4096||{i}" for t in tasks[2:] for i in range(6)}
    pending = [f"{t}|fp|4096||{i}" for t in tasks for i in range(10) if f"{t}|fp|4096||{i}" not in done]
    for world in (2, 3, 4, 8):
        shares = [Ranks(rank, world).share(pending) for rank in range(world)]
        assert sum(map(len, shares)) == len(pending) and set().union(*shares) == set(pending)
        for task in tasks:
            counts = [sum(k.startswith(task + "|") for k in share) for share in shares]
            assert max(counts) - min(counts) <= 1, (world, task, counts)
