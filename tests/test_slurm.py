"""The Slurm scripts under a real Slurm: a one-node cluster on localhost (scripts/local_slurm.sh:
Debian's slurm-wlm + munge, installed by the script when root) runs ``sbatch
slurm/midtrain_128k.sh`` with the tiny CPU config through the environment overrides, is sent the
time-limit signal (USR1) mid-run, checkpoints, requeues itself and resumes to the end. Skipped,
with the reason, where Slurm cannot run (not root and not installed). Also: shellcheck on every
shell script of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_jobs import free_port, job_state, time_limit_requeue_resumes, wait_for

ROOT = Path(__file__).resolve().parents[1]


def test_sbatch_midtrain_tiny_cpu_requeues_on_time_limit_and_resumes(slurm_env, tmp_path):
    time_limit_requeue_resumes(slurm_env, tmp_path)


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


def _stand_in_slurm(tmp_path: Path, hosts: list[str]) -> dict[str, str]:
    """An environment for the Slurm scripts without a cluster: stand-ins for ``srun`` (writes its
    arguments, one per line, to ``tmp_path/args`` and its NCCL/TORCH/CUDA_DEVICE variables to
    ``tmp_path/args.env``) and ``scontrol show hostnames`` (prints ``hosts``), first on PATH; the
    caller's own SLURM_/NCCL_/CONTAINER_ variables removed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n'
                                  'env | grep -E "^(NCCL|TORCH|CUDA_DEVICE)" | sort > "$ARGS_OUT.env"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '%s\\n' " + " ".join(hosts) + "\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "CONTAINER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", ARGS_OUT=str(tmp_path / "args"), LONGROPE2_DIR=str(ROOT))
    return env


def test_launcher_runs_one_torchrun_per_node_with_c10d_nccl_and_the_container(tmp_path):
    """The 8-node command line, with stand-ins for srun and scontrol (no cluster needed)."""
    env = _stand_in_slurm(tmp_path, [f"gpu-node-{i:02d}" for i in range(1, 9)])
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[01-08]", SLURM_NNODES="8",
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


def _launch_with_stand_in_srun(tmp_path, **env_vars) -> subprocess.CompletedProcess:
    """slurm/midtrain_128k.sh on 2 made-up nodes (job 77, third restart) under ``_stand_in_slurm``."""
    env = _stand_in_slurm(tmp_path, ["gpu-node-01", "gpu-node-02"])
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu-node-[01-02]", SLURM_NNODES="2",
               SLURM_CPUS_ON_NODE="64", SLURM_RESTART_COUNT="3", **env_vars)
    return subprocess.run(["bash", str(ROOT / "slurm/midtrain_128k.sh")], env=env, capture_output=True, text=True)


TORCHRUN_ON_TWO_NODES = ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                         "--rdzv-id=77.3", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-01:20773",
                         "launch/train.py", "--config", "configs/llama3_8b_128k.yaml"]


def test_launcher_runs_torchrun_in_apptainer_with_the_checkout_bound_and_the_gpus(tmp_path):
    """Not run for real (apptainer is not packaged here): the command line srun is given."""
    proc = _launch_with_stand_in_srun(tmp_path, CONTAINER_RUNTIME="apptainer",
                                      CONTAINER_IMAGE="/shared/longrope2.sif", CONTAINER_MOUNTS="/data:/data")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    start = args.index("apptainer")
    assert args[start:] == ["apptainer", "exec", "--bind", f"{ROOT}:/opt/longrope2,/data:/data",
                            "--pwd", "/opt/longrope2", "--nv", "/shared/longrope2.sif", *TORCHRUN_ON_TWO_NODES]
    assert not any(a.startswith("--container-image") for a in args)  # not pyxis as well
    assert "apptainer image /shared/longrope2.sif" in proc.stdout


def test_launcher_podman_command_line_and_a_bad_runtime(tmp_path):
    """The podman command line srun is given on GPU nodes (the CPU path runs for real in
    tests/test_container.py); an unknown CONTAINER_RUNTIME is one line and exit 2."""
    proc = _launch_with_stand_in_srun(tmp_path, CONTAINER_RUNTIME="podman", CONTAINER_IMAGE="longrope2:latest",
                                      NCCL_IB_HCA="mlx5_0")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    start = args.index("podman")
    end = args.index("longrope2:latest")
    podman = args[start:end]
    assert podman[:8] == ["podman", "run", "--rm", "--network", "host", "--uts", "host", "--ipc"]
    assert ["-v", f"{ROOT}:/opt/longrope2"] == podman[podman.index("-v"):podman.index("-v") + 2]
    passed = {podman[i + 1] for i, a in enumerate(podman) if a == "-e"}
    assert {"NCCL_IB_HCA", "SLURM_JOB_ID", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "OMP_NUM_THREADS"} <= passed
    assert not passed & {"PATH", "HOME", "LONGROPE2_DIR"}
    assert podman[-2:] == ["--device", "nvidia.com/gpu=all"]
    assert args[end + 1:] == TORCHRUN_ON_TWO_NODES

    proc = _launch_with_stand_in_srun(tmp_path, CONTAINER_RUNTIME="docker", CONTAINER_IMAGE="x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: CONTAINER_RUNTIME=docker: expected pyxis, apptainer, singularity or podman"]


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
    env = _stand_in_slurm(tmp_path, ["node1"])
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1")
    for restarts, tail in (("0", ["launch/search.py", "--config", "configs/search/smollm2_32k_gpu.yaml"]),
                           ("2", ["launch/search.py", "--config", "configs/search/smollm2_32k_gpu.yaml", "--resume"])):
        subprocess.run(["bash", str(ROOT / "slurm/search.sh")], env=dict(env, SLURM_RESTART_COUNT=restarts),
                       check=True, capture_output=True)
        assert (tmp_path / "args").read_text().split("\n")[-len(tail) - 1:-1] == tail
