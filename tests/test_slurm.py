"""The Slurm scripts under a real Slurm: a one-node cluster on localhost (scripts/local_slurm.sh:
Debian's slurm-wlm + munge, installed by the script when root) runs ``sbatch
slurm/midtrain_128k.sh`` with the tiny CPU config through the environment overrides, is sent the
time-limit signal (USR1) mid-run, checkpoints, requeues itself and resumes to the end. Skipped,
with the reason, where Slurm cannot run (not root and not installed). Also: shellcheck on every
shell script of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_jobs import alive, free_port, job_state, log_text, wait_for

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = os.environ.get("LONGROPE2_SLURM_DIR", "/tmp/longrope2-slurm")


@pytest.fixture(scope="module")
def slurm_env():
    pids = [Path(SLURM_DIR) / "slurmctld.pid", Path(SLURM_DIR) / "slurmd.pid"]
    was_running = all(alive(p) for p in pids)
    proc = subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "start"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no local Slurm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, SLURM_CONF=f"{SLURM_DIR}/slurm.conf")
    yield env
    if not was_running:
        subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "stop"], check=False)


def test_sbatch_midtrain_tiny_cpu_requeues_on_time_limit_and_resumes(slurm_env, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    steps = 40
    cfg.update(output_dir=str(tmp_path / "run"), train_steps=steps, save_interval=0)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "logs").mkdir()
    env = dict(slurm_env, CONFIG=str(config), NPROC_PER_NODE="2", DEVICE="cpu", LONGROPE2_DIR=str(ROOT),
               MASTER_PORT=str(free_port()))
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


def _shell_scripts() -> list[Path]:
    scripts = [p for d in ("scripts", "slurm", "docker", ".ci", "benchmarks") for p in sorted((ROOT / d).glob("*"))
               if p.is_file() and (p.suffix == ".sh" or p.read_text(errors="ignore").startswith("#!/usr/bin/env bash"))]
    return scripts


def test_shellcheck_every_shell_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run installs it as root)")
    scripts = _shell_scripts()
    assert {"slurm/midtrain_128k.sh", "slurm/search.sh", "scripts/local_slurm.sh", ".ci/run"} <= \
        {str(p.relative_to(ROOT)) for p in scripts}
    proc = subprocess.run(["shellcheck", "--severity=info", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launcher_runs_one_torchrun_per_node_with_c10d_nccl_and_the_container(tmp_path):
    """The 8-node command line, with stand-ins for srun and scontrol (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n'
                                  'env | grep -E "^(NCCL|TORCH|CUDA_DEVICE)" | sort > "$ARGS_OUT.env"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu-node-%02d\\n" 1 2 3 4 5 6 7 8\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", ARGS_OUT=str(tmp_path / "args"), LONGROPE2_DIR=str(ROOT),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[01-08]", SLURM_NNODES="8",
               SLURM_CPUS_ON_NODE="128", CONTAINER_IMAGE="/shared/longrope2.sqsh", CONTAINER_MOUNTS="/data:/data",
               NCCL_IB_HCA="mlx5_0,mlx5_1")
    proc = subprocess.run(["bash", str(ROOT / "slurm/midtrain_128k.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args[:4] == ["--nodes=8", "--ntasks-per-node=1", "--cpus-per-task=128", "--kill-on-bad-exit=1"]
    assert "--container-image=/shared/longrope2.sqsh" in args
    assert f"--container-mounts={ROOT}:/opt/longrope2,/data:/data" in args
    assert args[args.index("--container-workdir=/opt/longrope2") + 1:] == [
        "python", "-m", "torch.distributed.run", "--nnodes=8", "--nproc-per-node=8", "--rdzv-id=4242.0",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-01:22420", "launch/train.py", "--config",
        "configs/llama3_8b_128k.yaml"]
    nccl = dict(line.split("=", 1) for line in (tmp_path / "args.env").read_text().split())
    assert nccl["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"  # the environment wins over the defaults
    assert nccl["NCCL_SOCKET_IFNAME"] == "^lo,docker0" and nccl["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert nccl["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "job 4242 (restart 0) on 8 node(s) x 8 ranks, rendezvous gpu-node-01:22420, gpu" in proc.stdout


def test_sbatch_search_tiny_cpu(slurm_env, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/search/tiny.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "search")
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "logs").mkdir()
    env = dict(slurm_env, CONFIG=str(config), NPROC_PER_NODE="2", DEVICE="cpu", LONGROPE2_DIR=str(ROOT),
               MASTER_PORT=str(free_port()))
    job = subprocess.run(["sbatch", "--parsable", "--gpus-per-node", "0", "--time", "30", str(ROOT / "slurm/search.sh")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    log = tmp_path / "logs" / f"longrope2-search-{job}.out"
    try:
        wait_for(lambda: job_state(env, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
              "the search job to finish", log)
    finally:
        if job_state(env, job) in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], env=env, check=False)
    text = log.read_text()
    assert job_state(env, job) == "COMPLETED", text[-3000:]
    assert "on 1 node(s) x 2 ranks" in text and "[slurm] done (rc 0)" in text
    best = json.loads((tmp_path / "search/best.json").read_text())
    assert best["needle_ppl"] > 0 and sorted((tmp_path / "search").glob("scores.worker*.jsonl"))  # 2 workers


def test_search_script_resumes_after_a_requeue(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho node1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", ARGS_OUT=str(tmp_path / "args"), LONGROPE2_DIR=str(ROOT),
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1")
    for restarts, tail in (("0", ["launch/search.py", "--config", "configs/search/smollm2_32k_gpu.yaml"]),
                           ("2", ["launch/search.py", "--config", "configs/search/smollm2_32k_gpu.yaml", "--resume"])):
        subprocess.run(["bash", str(ROOT / "slurm/search.sh")], env=dict(env, SLURM_RESTART_COUNT=restarts),
                       check=True, capture_output=True)
        assert (tmp_path / "args").read_text().split("\n")[-len(tail) - 1:-1] == tail
