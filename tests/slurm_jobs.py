"""Submitting and watching jobs on the local Slurm clusters of the tests (scripts/local_slurm.sh)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def log_text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def step_losses(text: str) -> dict[int, float]:
    """step -> loss from the trainer's log lines (the last occurrence wins)."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step +(\d+) \| loss ([0-9.]+)", text, re.M)}


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def time_limit_requeue_resumes(slurm_env, tmp_path: Path, **launcher_env: str) -> str:
    """``sbatch slurm/midtrain_128k.sh`` with the tiny CPU config (40 steps) on the one-node local
    Slurm, sent the time-limit signal (USR1) after the first step: the job saves, requeues itself,
    resumes at the saved step and logs every step once to the end. ``launcher_env`` goes to
    slurm/torchrun.sh (e.g. a container). Returns the job's log."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    steps = 40
    cfg.update(output_dir=str(tmp_path / "run"), train_steps=steps, save_interval=0)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "logs").mkdir()
    env = dict(slurm_env, CONFIG=str(config), NPROC_PER_NODE="2", DEVICE="cpu", LONGROPE2_DIR=str(ROOT), **launcher_env)
    # the script as a user submits it; only the header's GPU cluster shape is overridden
    job = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--gpus-per-node", "0", "--time", "30",
                          str(ROOT / "slurm/midtrain_128k.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout.strip().split(";")[0]
    log = tmp_path / "logs" / f"longrope2-midtrain-{job}.out"  # #SBATCH --output=logs/%x-%j.out
    try:
        wait_for(lambda: "step      1 |" in log_text(log), 240, "the first training step", log)
        # what Slurm sends 10 minutes before the time limit (--signal=B:USR1@600)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        wait_for(lambda: job_state(env, job) == "PENDING", 120, "the job to requeue itself", log)
        # a requeued job is held ~2 minutes (Slurm's begin-time delay); release it now
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)
        wait_for(lambda: job_state(env, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
              "the requeued job to finish", log)
    finally:
        if job_state(env, job) in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job], env=env, check=False)
    text = log.read_text()
    assert job_state(env, job) == "COMPLETED", text[-3000:]

    first, _, second = text.partition("(restart 1)")
    assert "(restart 0)" in first and second, text[-3000:]
    saved = int(re.search(r"\[train\] SIGTERM: saved step (\d+), stopping", first).group(1))
    assert 1 <= saved < steps
    assert f"requeueing job {job}" in first
    assert re.search(rf"\[ckpt\] resumed from \S+iter_{saved:07d} at step {saved}", second)
    losses = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step +(\d+) \| loss ([0-9.]+)", text, re.M)}
    assert sorted(losses) == list(range(1, steps + 1)), sorted(losses)  # every step exactly once
    assert losses[steps] < losses[1]
    assert "[slurm] done (rc 0)" in second
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == f"iter_{steps:07d}"
    return text
