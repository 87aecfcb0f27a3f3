"""docker/Dockerfile built and run for real. ``docker/build_local.sh --smoke`` makes a Debian
bookworm + Python 3.11 base with debootstrap, builds the project's image on it with podman (the
pinned CPU torch), and runs inside it, without network and as uid 1000: ``longrope2 inspect``, the
tiny training under torchrun (2 ranks) and the tiny search. The tests compare those runs with the
same runs on the host, and submit ``slurm/midtrain_128k.sh`` with ``CONTAINER_RUNTIME=podman`` to
the local Slurm: it trains in the image, requeues itself on the time-limit signal and resumes.
Skipped, with the reason, where podman cannot build images here (not root, or podman, runc or
debootstrap missing; .ci/run installs them as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_jobs import time_limit_requeue_resumes
from torchrun import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("LONGROPE2_TEST_IMAGE", "longrope2:cpu")
PODMAN = str(ROOT / "docker/podman.sh")


def _why_no_podman() -> str | None:
    if os.geteuid() != 0:
        return "building the base image needs root (debootstrap)"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc debootstrap; .ci/run does)"
    return None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The image built (cached layers are reused) and the smoke runs' outputs."""
    reason = _why_no_podman()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("image-smoke")
    proc = subprocess.run(["bash", str(ROOT / "docker/build_local.sh"), "--smoke"], capture_output=True, text=True,
                          env=dict(os.environ, IMAGE=IMAGE, SMOKE_DIR=str(out)), timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (out / "build.out").write_text(proc.stdout)
    return out


def _metrics(path: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r}


def test_tiny_training_in_the_image_matches_the_host(smoke, tmp_path):
    """The same config, torch wheel and books: the curve inside the image is the host's, bit for bit."""
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_torchrun(2, str(ROOT / "launch/train.py"), "--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    inside = _metrics(smoke / "runs/tiny/metrics.jsonl")
    assert sorted(inside) == list(range(1, config["train_steps"] + 1))
    assert inside == _metrics(tmp_path / "run/metrics.jsonl")


def test_tiny_search_in_the_image_matches_the_host(smoke, tmp_path):
    proc = run_torchrun(2, str(ROOT / "launch/search.py"), "--config", str(ROOT / "configs/search/tiny.yaml"),
                        "--output-dir", str(tmp_path / "search"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inside, host = (json.loads((d / "state.json").read_text()) for d in (smoke / "search", tmp_path / "search"))
    assert inside["scored"] and inside == host
    best = [json.loads((d / "best.json").read_text()) for d in (smoke / "search", tmp_path / "search")]
    for result in best:
        result.pop("seconds")
    assert best[0]["heldout"] and best[0] == best[1]


def test_inspect_in_the_image_prints_what_the_host_prints(smoke):
    host = subprocess.run([str(ROOT / ".venv/bin/longrope2") if (ROOT / ".venv/bin/longrope2").exists()
                           else "longrope2", "inspect", "smollm2_135m", "--target-length", "32768"],
                          capture_output=True, text=True, check=True).stdout
    assert host.strip() and (smoke / "inspect.txt").read_text() == host


def test_image_runs_as_an_arbitrary_user_without_network(smoke):
    """pyxis/enroot and apptainer run as the calling user: code, model and books are readable by
    any uid, and nothing needs the network or a writable home."""
    script = ("import os, socket, longrope2, megatron.core; from longrope2.data.books import load_books; "
              "print(os.getuid(), len(load_books()), socket.gethostbyname('localhost'))")
    proc = subprocess.run([PODMAN, "run", "--rm", "--network", "none", "--user", "4321:4321", IMAGE,
                           "python", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uid, books, _ = proc.stdout.split()
    assert uid == "4321" and int(books) >= 6


def test_sbatch_with_podman_trains_in_the_image_and_resumes_after_a_requeue(smoke, slurm_env, tmp_path):
    text = time_limit_requeue_resumes(slurm_env, tmp_path, CONTAINER_RUNTIME="podman", CONTAINER_IMAGE=IMAGE,
                                      PODMAN=PODMAN, CONTAINER_MOUNTS=f"{tmp_path}:{tmp_path}")
    assert f"podman image {IMAGE}" in text
    # the image's megatron-core (Debian's dist-packages), not the checkout's .venv, warned here
    assert "/usr/local/lib/python3.11/dist-packages/megatron/core" in text
    assert ".venv/lib" not in text
