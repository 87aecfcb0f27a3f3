"""Several nodes on one machine (``scripts/local_cluster.sh``: a network namespace per node with
its own address and hostname on a private bridge): torchrun across two nodes, the c10d/gloo
traffic going over the nodes' links, gives the single-node results. The tiny training with DP
across the nodes (and TP inside each) has the single-node loss curve; the tiny search with one
worker per node ends in the single-node search state; a node whose processes are killed stops
the other one within seconds, and a cut link within the configured collective timeout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torchrun import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "local_cluster.sh"

pytestmark = pytest.mark.distributed


def _cannot_make_nodes() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "needs iproute2 (ip) and util-linux (nsenter)"
    probe = subprocess.run(["ip", "netns", "add", "lr2probe"], capture_output=True, text=True)
    if probe.returncode:
        return f"network namespaces not permitted here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "lr2probe"], check=False)
    return None


@pytest.fixture(scope="module")
def nodes():
    reason = _cannot_make_nodes()
    if reason:
        pytest.skip(reason)
    subprocess.run(["bash", str(CLUSTER), "up", "2"], check=True, capture_output=True)
    try:
        yield ["lr2n1", "lr2n2"]
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], check=False, capture_output=True)


def start_on_nodes(nodes: list[str], nproc: int, script: Path, *args: str, port: int) -> list[subprocess.Popen]:
    """One torchrun per node (static rendezvous on the first node's address), as
    slurm/torchrun.sh starts them with srun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", "PYTHONWARNINGS": "ignore"}
    procs = []
    for rank, node in enumerate(nodes):
        cmd = ["bash", str(CLUSTER), "exec", node, sys.executable, "-m", "torch.distributed.run",
               f"--nnodes={len(nodes)}", f"--node-rank={rank}", f"--nproc-per-node={nproc}",
               "--master-addr=10.77.0.1", f"--master-port={port}", str(script), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"a node did not finish within {timeout:g} s:\n{out[-3000:]}")
        results.append((proc.returncode, out))
    return results


def tiny_train(tmp_path: Path, name: str, **changes) -> Path:
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config.update(output_dir=str(tmp_path / name), train_steps=4, save_interval=0)
    for key, value in changes.items():
        config["parallel"][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def curve(out: Path) -> list[tuple[float, float]]:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(s["loss"], s["grad_norm"]) for s in steps if "loss" in s]


@pytest.mark.parametrize("nproc, tp", [(1, 1), (2, 2)], ids=["dp2-across-nodes", "tp2-in-node-dp2-across"])
def test_training_across_two_nodes_matches_one_node(tmp_path, nodes, nproc, tp):
    one = tiny_train(tmp_path, "one", tp=tp)
    proc = run_torchrun(2 * nproc, str(ROOT / "launch/train.py"), "--config", str(one), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tiny_train(tmp_path, "two", tp=tp)
    results = wait_all(start_on_nodes(nodes, nproc, ROOT / "launch/train.py", "--config", str(two), port=29711 + tp))
    for code, out in results:
        assert code == 0, out[-3000:]
    assert "dp=2" in results[0][1] and f"tp={tp}" in results[0][1]
    assert curve(tmp_path / "two") == curve(tmp_path / "one")  # bit for bit: the same reductions, over links


def test_search_with_one_worker_per_node_matches_one_process(tmp_path, nodes):
    config = yaml.safe_load((ROOT / "configs/search/tiny.yaml").read_text())
    config["needle"] = {"documents": 2, "heldout_documents": 1, "heldout_depths": [0.5]}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    launch = ROOT / "launch/search.py"
    proc = run_torchrun(1, str(launch), "--config", str(path), "--output-dir", str(tmp_path / "one"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = wait_all(start_on_nodes(nodes, 1, launch, "--config", str(path), "--output-dir", str(tmp_path / "two"),
                                      port=29721))
    for code, out in results:
        assert code == 0, out[-3000:]
    state = [json.loads((tmp_path / d / "state.json").read_text()) for d in ("one", "two")]
    assert state[0] == state[1]
    # both nodes' workers scored candidates
    assert all((tmp_path / "two" / f"scores.worker{w}.jsonl").stat().st_size > 0 for w in (0, 1))


def test_a_lost_search_node_never_hangs_the_search_and_resume_finishes_it(tmp_path, nodes):
    """The tiny search with one worker per node loses node 2 (every process killed) mid-way.
    Either node 2 held a candidate: node 1 stops after the pool's worker timeout (20 s here) with
    a "rerun with --resume" message; or it held none: node 1 scores the rest alone and writes the
    results (torchrun's exit barrier then waits for the lost agent). Either way, within a minute,
    and after `--resume` on the remaining node the state is the uninterrupted one, nothing
    scored twice."""
    config = yaml.safe_load((ROOT / "configs/search/tiny.yaml").read_text())
    config.update(worker_timeout_s=20, needle={"documents": 2, "heldout_documents": 1, "heldout_depths": [0.5]})
    config["evolution"].update(iterations=8)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    launch = ROOT / "launch/search.py"
    proc = run_torchrun(1, str(launch), "--config", str(path), "--output-dir", str(tmp_path / "one"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "lost"
    procs = start_on_nodes(nodes, 1, launch, "--config", str(path), "--output-dir", str(out), port=29751)
    log1 = out / "scores.worker1.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log1.exists() and len(log1.read_text().splitlines()) >= 6):
        time.sleep(0.1)
    assert procs[0].poll() is None, "the search ended before node 2 could be lost"
    subprocess.run(["bash", str(CLUSTER), "kill", nodes[1]], check=True)
    lost_at = time.time()
    while time.time() - lost_at < 90 and procs[0].poll() is None and not (out / "best.json").exists():
        time.sleep(0.2)
    settled_after = time.time() - lost_at
    finished_alone = (out / "best.json").exists()
    if procs[0].poll() is None:
        subprocess.run(["bash", str(CLUSTER), "kill", nodes[0]], check=True)
    text, _ = procs[0].communicate(timeout=60)
    procs[1].communicate(timeout=60)
    print(f"node 1 {'finished alone' if finished_alone else 'stopped'} {settled_after:.1f} s after node 2 was lost")
    assert settled_after < 60, f"node 1 neither stopped nor finished within {settled_after:.0f} s"
    if not finished_alone:
        assert "rerun with --resume" in text, text[-3000:]
    proc = run_torchrun(1, str(launch), "--config", str(path), "--output-dir", str(out), "--resume", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "state.json").read_text()) == json.loads((tmp_path / "one" / "state.json").read_text())
    keys = [json.loads(line)["key"] for log in out.glob("scores.worker*.jsonl") for line in log.read_text().splitlines()
            if line.strip().endswith("}")]
    assert len(keys) == len(set(keys))


def _start_long_training(tmp_path, nodes, name: str, port: int, **changes) -> tuple[list[subprocess.Popen], Path]:
    path = tiny_train(tmp_path, name)
    config = yaml.safe_load(path.read_text())
    config.update(train_steps=400, log_interval=1, **changes)
    path.write_text(yaml.safe_dump(config))
    procs = start_on_nodes(nodes, 1, ROOT / "launch/train.py", "--config", str(path), port=port)
    metrics = tmp_path / name / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert procs[0].poll() is None and procs[1].poll() is None, "training ended before the fault"
    return procs, metrics


def _seconds_until_node1_stops(procs: list[subprocess.Popen], since: float, limit: float = 180) -> tuple[float, str]:
    try:
        out, _ = procs[0].communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        out, _ = procs[0].communicate()
        pytest.fail(f"node 1 still runs {limit:g} s after the fault:\n{out[-3000:]}")
    assert procs[0].returncode != 0
    seconds = time.time() - since
    errors = [line.strip() for line in out.splitlines() if "Error" in line and "Traceback" not in line]
    print(f"node 1's first error line: {errors[0] if errors else '(none)'}")
    return seconds, out


def test_a_killed_node_stops_the_other_within_seconds(tmp_path, nodes):
    """Every process of node 2 is SIGKILLed mid-training (a node dying): node 1's worker fails
    its next collective at once (gloo sees the closed connection) and its torchrun exits non-zero,
    not after the 30-minute collective timeout."""
    procs, _ = _start_long_training(tmp_path, nodes, "killed", 29731)
    subprocess.run(["bash", str(CLUSTER), "kill", nodes[1]], check=True)  # torchrun's workers have their own sessions
    stopped_after, out = _seconds_until_node1_stops(procs, time.time())
    procs[1].communicate()
    print(f"node 1 stopped {stopped_after:.1f} s after node 2 was killed")
    assert stopped_after < 60, f"node 1 took {stopped_after:.0f} s to stop"
    assert "Connection closed by peer" in out or "Connection reset by peer" in out, out[-3000:]


def test_a_cut_link_stops_the_job_within_the_collective_timeout(tmp_path, nodes):
    """Node 2's link goes down mid-training (no connection is closed, packets just vanish): with
    ``collective_timeout_s: 20`` node 1 stops within about that, with gloo's timeout error."""
    procs, _ = _start_long_training(tmp_path, nodes, "cut", 29741, collective_timeout_s=20)
    subprocess.run(["bash", str(CLUSTER), "cut", nodes[1]], check=True)
    try:
        stopped_after, out = _seconds_until_node1_stops(procs, time.time())
    finally:
        subprocess.run(["bash", str(CLUSTER), "heal", nodes[1]], check=True)
        subprocess.run(["bash", str(CLUSTER), "kill", nodes[1]], check=False)
        procs[1].communicate()
    print(f"node 1 stopped {stopped_after:.1f} s after node 2's link was cut")
    assert 15 < stopped_after < 90, f"node 1 stopped after {stopped_after:.0f} s"
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]


# --- real Slurm across the namespace nodes ---------------------------------------------------------


@pytest.fixture(scope="module")
def slurm2(nodes):
    """slurmctld on the host (the bridge address), one slurmd inside each node."""
    env = dict(os.environ, LONGROPE2_SLURM_NODES="2")
    proc = subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "start"], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode == 3:
        pytest.skip(f"no local Slurm: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    conf = subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "env"], capture_output=True, text=True,
                          env=env, check=True).stdout.strip().split("=", 1)[1]
    yield dict(os.environ, SLURM_CONF=conf)
    subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "stop"], check=False, env=env)


def _sbatch(env, tmp_path: Path, script: str, config: Path, *args: str) -> tuple[str, Path, dict]:
    from slurm_jobs import free_port

    (tmp_path / "logs").mkdir(exist_ok=True)
    job_env = dict(env, CONFIG=str(config), NPROC_PER_NODE="1", DEVICE="cpu", LONGROPE2_DIR=str(ROOT),
                   MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    job = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--gpus-per-node", "0", "--time", "30", *args,
                          str(ROOT / script)], cwd=tmp_path, env=job_env, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    name = "midtrain" if "midtrain" in script else "search"
    return job, tmp_path / "logs" / f"longrope2-{name}-{job}.out", job_env


def _finish(env, job: str, log: Path, timeout: float = 400) -> str:
    from slurm_jobs import FINISHED, job_state, wait_for

    try:
        wait_for(lambda: job_state(env, job) in FINISHED, timeout, f"job {job} to finish", log)
    finally:
        if job_state(env, job) not in FINISHED:
            subprocess.run(["scancel", job], env=env, check=False)
    return job_state(env, job)


def _training_processes(node: str) -> list[str]:
    """Pids of every process in the node's network namespace but Slurm's own daemons."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout.split()
    return [p for p in pids if not Path(f"/proc/{p}/cmdline").read_text(errors="ignore").startswith("slurm")]


def _requeue_now(env, job: str) -> None:
    """What Slurm's own requeue after a preemption or a node failure does, without its delay."""
    from slurm_jobs import job_state, wait_for

    def cleaned_up() -> bool:
        # Skipping Slurm's requeue delay must not skip its clean-up: a node still completing the job,
        # or a step daemon of the old run still draining output, signals the new run's step (the
        # requeued job reuses the job and step ids)
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout
        titles = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        leftovers = [p for node in ("lr2n1", "lr2n2") for p in _training_processes(node)]
        return (states.split() == ["idle", "idle"] and not leftovers
                and not any(t.startswith(f"slurmstepd: [{job}.") for t in titles))

    wait_for(cleaned_up, 180, "both nodes to finish the job's clean-up")
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    wait_for(lambda: job_state(env, job) == "PENDING", 60, f"job {job} to be pending")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)


def _metrics(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm); the last record of a step wins (a resumed run re-logs steps)."""
    steps = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = (record["loss"], record["grad_norm"])
    return steps


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory):
    """The tiny training (40 steps, a checkpoint every 10) on one node with 2 ranks."""
    root = tmp_path_factory.mktemp("reference")
    path = tiny_train(root, "one")
    config = yaml.safe_load(path.read_text())
    config.update(train_steps=40, save_interval=10)
    path.write_text(yaml.safe_dump(config))
    proc = run_torchrun(2, str(ROOT / "launch/train.py"), "--config", str(path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, _metrics(root / "one")


def _two_node_config(tmp_path: Path, reference: Path) -> Path:
    config = yaml.safe_load(reference.read_text())
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sbatch_two_nodes_preempted_with_sigterm_resumes_on_the_one_node_curve(slurm2, tmp_path, reference_curve):
    """`sbatch --nodes 2 slurm/midtrain_128k.sh` (one torchrun per node through srun, c10d on the
    first node), preempted with `scancel --signal=TERM` after its first periodic checkpoint: the
    ranks save and stop, the requeued job resumes from that checkpoint, and the curve over both runs is the
    uninterrupted one-node curve."""
    from slurm_jobs import log_text, wait_for

    reference, expected = reference_curve
    job, log, env = _sbatch(slurm2, tmp_path, "slurm/midtrain_128k.sh", _two_node_config(tmp_path, reference))
    # after a periodic checkpoint, so that megatron's checkpoint writer already runs its helper process
    wait_for(lambda: "[ckpt] saved step 10" in log_text(log), 300, "the first periodic checkpoint", log)
    wait_for(lambda: "step     12 |" in log_text(log), 120, "step 12", log)
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)  # a preemption: every step's tasks
    # torchrun's agents exit 1 on SIGTERM once their ranks have saved, so Slurm marks the job FAILED
    # (what Slurm's preemption requeue does not look at)
    assert _finish(env, job, log) in ("FAILED", "COMPLETED"), log_text(log)[-3000:]
    first = log_text(log)
    assert "on 2 node(s) x 1 ranks, rendezvous lr2n1:" in first and "dp=2" in first
    saved = int(re.search(r"\[train\] SIGTERM: saved step (\d+), stopping", first).group(1))
    assert 12 <= saved < 40
    _requeue_now(env, job)
    assert _finish(env, job, log) == "COMPLETED", log_text(log)[-3000:]
    second = log_text(log)[len(first):]
    assert "(restart 1)" in second and f"at step {saved}" in second
    assert _metrics(tmp_path / "run") == expected


def test_sbatch_two_nodes_node_failure_then_requeue_ends_on_the_one_node_curve(slurm2, tmp_path, reference_curve):
    """Every process of node 2 but slurmd/slurmstepd is SIGKILLed mid-job (the training dies,
    Slurm survives): the job fails within seconds with the lost node named in the log, and
    requeued it resumes from the last periodic checkpoint to the uninterrupted curve."""
    from slurm_jobs import log_text, wait_for

    reference, expected = reference_curve
    job, log, env = _sbatch(slurm2, tmp_path, "slurm/midtrain_128k.sh", _two_node_config(tmp_path, reference))
    wait_for(lambda: "[ckpt] saved step 10" in log_text(log), 300, "the first checkpoint", log)
    wait_for(lambda: "step     12 |" in log_text(log), 120, "step 12", log)
    victims = _training_processes("lr2n2")  # torchrun, the rank, its helpers
    assert victims, "no training process on lr2n2"
    killed = time.time()
    subprocess.run(["kill", "-9", *victims], check=False)
    state = _finish(env, job, log, timeout=180)
    failed_after = time.time() - killed
    text = log_text(log)
    assert state == "FAILED", text[-3000:]
    assert failed_after < 90, f"the job took {failed_after:.0f} s to fail"
    print(f"the job failed {failed_after:.1f} s after node 2's training processes were killed")
    # the lost node by name: srun's "lr2n2: task 1: Killed", or gloo's peer address when node 1's
    # rank saw the connection drop before srun cancelled the step
    assert re.search(r"lr2n2: task \d+: Killed|10\.77\.0\.2", text), text[-3000:]
    # the last checkpoint saved before the kill: step 10, or 20 when the steps outran the kill
    last = int(re.findall(r"\[ckpt\] saved step (\d+)", text)[-1])
    _requeue_now(env, job)
    assert _finish(env, job, log) == "COMPLETED", log_text(log)[-3000:]
    assert re.search(rf"resumed from \S+iter_{last:07d} at step {last} ", log_text(log))
    assert _metrics(tmp_path / "run") == expected


def test_sbatch_two_nodes_search_matches_one_process(slurm2, tmp_path):
    config = yaml.safe_load((ROOT / "configs/search/tiny.yaml").read_text())
    config.update(output_dir=str(tmp_path / "search"),
                  needle={"documents": 2, "heldout_documents": 1, "heldout_depths": [0.5]})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_torchrun(1, str(ROOT / "launch/search.py"), "--config", str(path), "--output-dir",
                        str(tmp_path / "one"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job, log, env = _sbatch(slurm2, tmp_path, "slurm/search.sh", path)
    assert _finish(env, job, log) == "COMPLETED", log.read_text()[-3000:]
    assert "on 2 node(s) x 1 ranks" in log.read_text()
    state = [json.loads((tmp_path / d / "state.json").read_text()) for d in ("one", "search")]
    assert state[0] == state[1]
    assert all((tmp_path / "search" / f"scores.worker{w}.jsonl").stat().st_size > 0 for w in (0, 1))
