import os
import subprocess
from pathlib import Path

import pytest

# Each test process gets one thread: on 2-core machines two threads per process under load
# was up to 50x slower (DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm_env():
    """A one-node Slurm on localhost (scripts/local_slurm.sh), started for the module and stopped
    after it unless it was already running; skips with the script's reason where Slurm cannot run."""
    from slurm_jobs import alive

    slurm_dir = Path(os.environ.get("LONGROPE2_SLURM_DIR", "/tmp/longrope2-slurm"))
    pids = [slurm_dir / "slurmctld.pid", slurm_dir / "slurmd.pid"]
    was_running = all(alive(p) for p in pids)
    proc = subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "start"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no local Slurm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, SLURM_CONF=f"{slurm_dir}/slurm.conf")
    yield env
    if not was_running:
        subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "stop"], check=False)
