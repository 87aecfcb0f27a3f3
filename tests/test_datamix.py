"""The data mix (``longrope2 prepare-data --config MIX.yaml``, ``data/mix.py``): length buckets
with exact per-source token budgets from JSONL, parquet and the embedded books, read back with
megatron-core's ``IndexedDataset``; 1 and 2 workers and two array tasks give the same bytes; a
killed preparation resumes without redoing finished shards; training reads the manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pyarrow = pytest.importorskip("pyarrow", reason="parquet sources need pyarrow (the [test] extra)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """JSONL and parquet files as corpora ship them (a ``text`` field per record), cut from a real
    book so that their token lengths vary: 60 records of 20-3000 words, log-spread."""
    import pyarrow.parquet as pq

    from longrope2.data.books import embedded_book

    root = tmp_path_factory.mktemp("corpora")
    words = embedded_book("northanger_abbey").text.split()
    sizes = [int(20 * 150 ** ((i * 7 % 60) / 59)) for i in range(60)]
    texts, start = [], 0
    for n in sizes:
        texts.append(" ".join(words[start:start + n]))
        start += n
    with open(root / "web.jsonl", "w") as f:
        for i, text in enumerate(texts[:30]):
            f.write(json.dumps({"id": i, "text": text, "url": f"https://example.org/{i}"}) + "\n")
    pq.write_table(pyarrow.table({"content": texts[30:], "repo": [f"r{i}" for i in range(30)]}), root / "code.parquet",
                   row_group_size=8)
    return root


def mix_config(root: Path, inputs: Path, output: str = "mix", **changes) -> dict:
    config = yaml.safe_load((ROOT / "configs/data/cpu_mix.yaml").read_text())
    config["output"] = str(root / output)
    config["records_per_shard"] = 7
    config["sources"] += [
        {"name": "web", "paths": [str(inputs / "web.jsonl")], "budgets": {"short": 1_000, "mid": 5_000},
         "shorter": "drop", "longer": "drop"},
        {"name": "code", "paths": [str(inputs / "*.parquet")], "text_field": "content",
         "budgets": {"mid": 8_000, "long": None}, "shorter": "concat"},
    ]
    config.update(changes)
    return config


def run_mix(config: dict, **kwargs):
    from longrope2.configs import from_dict
    from longrope2.data.mix import MixConfig, run_mix as run

    return run(from_dict(MixConfig, config, "mix"), progress=False, **kwargs)


def dataset_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.idx"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs):
    root = tmp_path_factory.mktemp("mix")
    config = mix_config(root, inputs)
    return config, run_mix(config, workers=2)


def test_buckets_hold_exactly_the_budgets(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    config, manifest = built
    folder = Path(config["output"])
    assert manifest["sources"] == {"books_short": {"short": 150_000}, "books_long": {"mid": 120_000, "long": 300_000},
                                   "web": {"short": 1_000, "mid": 5_000}, "code": manifest["sources"]["code"]}
    assert manifest["sources"]["code"]["mid"] == 8_000 and manifest["sources"]["code"]["long"] > 0  # null: all of it
    assert manifest["shortfall"] == {}
    for name, bucket in manifest["buckets"].items():
        data = IndexedDataset(str(folder / name))
        lengths = data.sequence_lengths
        assert len(data) == bucket["documents"] and int(lengths.sum()) == bucket["tokens"]
        spec = config["buckets"][name]
        # every document in range, but a budget's last one, cut to fit (one per source)
        outside = int(((lengths < spec["min_tokens"]) | (lengths > spec["max_tokens"])).sum())
        assert outside <= len([s for s in config["sources"] if name in s["budgets"]])
        assert data[0].max() < 512
    assert manifest["buckets"]["short"]["tokens"] == 151_000 and manifest["buckets"]["long"]["budget"] is None
    datasets = [IndexedDataset(str(folder / b)) for b in manifest["buckets"]]  # alive: lengths are mmap views
    short = sum(int(d.sequence_lengths[d.sequence_lengths <= 256].sum()) for d in datasets)
    assert manifest["short_fraction"] == pytest.approx(short / manifest["tokens"])
    assert manifest["dropped"]["longer"] + manifest["dropped"]["shorter"] > 0  # web drops both ways


def test_one_worker_two_workers_and_two_array_tasks_write_the_same_bytes(tmp_path, inputs, built):
    config, manifest = built
    one = mix_config(tmp_path, inputs, "one")
    assert run_mix(one, workers=1)["buckets"] == manifest["buckets"]
    tasks = mix_config(tmp_path, inputs, "tasks")
    assert run_mix(tasks, shard_index=1, num_shards=2) is None  # task 0's shards are missing: no merge yet
    assert run_mix(tasks, shard_index=0, num_shards=2)["buckets"] == manifest["buckets"]
    reference = dataset_bytes(Path(config["output"]))
    assert dataset_bytes(tmp_path / "one") == reference == dataset_bytes(tmp_path / "tasks")


def test_killed_preparation_resumes_without_redoing_finished_shards(tmp_path, inputs, built):
    config, _ = built
    mix = mix_config(tmp_path, inputs, "killed")
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix))
    command = [sys.executable, "-m", "longrope2.cli", "prepare-data", "--config", str(path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("*.done.json"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the preparation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.done.json")}
    assert finished and not (tmp_path / "killed" / "manifest.json").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(parts.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert dataset_bytes(tmp_path / "killed") == dataset_bytes(Path(config["output"]))
    assert "short fraction" in rerun.stdout


@pytest.mark.parametrize("change, error", [
    ({"buckets": {"a": {"min_tokens": 1, "max_tokens": 100}, "b": {"min_tokens": 100, "max_tokens": 200}}},
     "overlap"),
    ({"window": 0}, "window"),
])
def test_bad_mix_configs_fail_in_one_line(tmp_path, inputs, change, error):
    config = mix_config(tmp_path, inputs, **change)
    with pytest.raises(ValueError, match=error):
        run_mix(config)


def test_unknown_bucket_and_missing_file_name_the_source(tmp_path, inputs):
    config = mix_config(tmp_path, inputs)
    config["sources"][2]["budgets"] = {"huge": 5}
    with pytest.raises(ValueError, match="source 'web': unknown buckets \\['huge'\\]"):
        run_mix(config)
    config = mix_config(tmp_path, inputs)
    config["sources"][3]["paths"] = [str(inputs / "nothing*.parquet")]
    with pytest.raises(FileNotFoundError, match="source 'code'.*matches no"):
        run_mix(config)


def test_training_config_reads_the_manifest(built):
    from longrope2.configs import from_dict
    from longrope2.train.config import DataConfig

    config, manifest = built
    data = from_dict(DataConfig, {"manifest": config["output"]}, "data")
    assert data.paths == [str(Path(config["output"]) / b) for b in ("short", "mid", "long")]
    assert data.short_fraction == manifest["short_fraction"]
    assert from_dict(DataConfig, {"manifest": config["output"], "short_fraction": 0.5}, "data").short_fraction == 0.5
    with pytest.raises(ValueError, match="paths or manifest"):
        from_dict(DataConfig, {"manifest": config["output"], "paths": ["x"]}, "data")


@pytest.mark.distributed
def test_tiny_training_runs_on_the_mix(tmp_path, built):
    from torchrun import run_torchrun

    config, manifest = built
    train = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    train.update(output_dir=str(tmp_path / "run"), train_steps=2, save_interval=0)
    train["optim"]["warmup_steps"] = 1
    train["data"] = {"manifest": config["output"], "seed": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train))
    proc = run_torchrun(2, str(ROOT / "launch" / "train.py"), "--config", str(path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    documents = sum(b["documents"] for b in manifest["buckets"].values())
    assert f"[data] {documents} documents, {manifest['tokens']} tokens" in log
    assert f"short token fraction {manifest['short_fraction']}" in log
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
