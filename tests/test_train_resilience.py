"""What a preemptible cluster run needs from the trainer, on CPU under torchrun: SIGTERM (Slurm's
preemption signal) saves a checkpoint and stops cleanly, and the resumed run continues the
uninterrupted curve; full activation recompute changes no number; ``load:`` starts from another
run's weights, at another parallel layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import LAUNCH, LAYOUTS, base_config, metrics, signal_run_at_step, write
from torchrun import run_torchrun, torchrun_env

pytestmark = pytest.mark.distributed

STEPS = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from longrope2.data.indexed import prepare_indexed
    from longrope2.data.tokenize import hashed_words

    prefix = tmp_path_factory.mktemp("data") / "books"
    prepare_indexed(prefix, hashed_words(512), 512, (), 32, 2048, seed=0, progress=False)
    return str(prefix)


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """One process, three runs in it: plain, with full recompute, and one that loads the plain
    run's final weights (in bf16, where the optimizer keeps separate fp32 main weights)."""
    root = tmp_path_factory.mktemp("single")
    configs = {
        "plain": base_config(root / "plain", data, train_steps=STEPS),
        "recompute": base_config(root / "recompute", data, train_steps=STEPS, recompute=True),
        "fresh_bf16": base_config(root / "fresh_bf16", data, train_steps=4, dtype="bfloat16"),
        "loaded_bf16": base_config(root / "loaded_bf16", data, train_steps=4, dtype="bfloat16",
                                   load=str(root / "plain" / "checkpoints")),
    }
    paths = [write(root / f"{name}.yaml", config) for name, config in configs.items()]
    proc = subprocess.run([sys.executable, str(LAYOUTS), *paths], env=torchrun_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc.stdout, {name: metrics(root / name) for name in configs}


def test_full_recompute_changes_no_number(single):
    _, _, runs = single
    plain, recompute = runs["plain"], runs["recompute"]
    assert sorted(plain) == sorted(recompute) == list(range(1, STEPS + 1))
    for step in plain:
        for key in ("loss", "grad_norm"):
            assert recompute[step][key] == pytest.approx(plain[step][key], rel=1e-6), (step, key)


def test_load_starts_from_the_weights_and_keeps_them(single):
    """``load:`` must reach the optimizer's fp32 main weights too: in bf16 they are a separate copy
    made when the optimizer is built, and a step would otherwise restore the random init.
    Measured: loaded 6.012, 6.002, 6.000, 5.972 vs fresh 6.253, 6.231, 6.205, 6.170; before the
    fix the loaded run jumped back to 6.241 at step 2."""
    root, stdout, runs = single
    assert f"[ckpt] weights from {root / 'plain' / 'checkpoints' / f'iter_{STEPS:07d}'}" in stdout
    fresh, loaded, trained = runs["fresh_bf16"], runs["loaded_bf16"], runs["plain"]
    # the loaded run starts where the trained one ended (same data order, so its step-1 batch is
    # the trained run's step-1 batch, now seen by trained weights), far below a fresh start
    assert loaded[1]["loss"] < fresh[1]["loss"] - 0.1, (loaded[1], fresh[1])
    assert loaded[1]["loss"] < trained[1]["loss"] - 0.1
    for step in (2, 3, 4):  # ...and stays there after optimizer steps
        assert loaded[step]["loss"] < fresh[step]["loss"] - 0.1, (step, loaded[step], fresh[step])


def test_load_reshards_to_another_layout(tmp_path, data, single):
    """The one-process checkpoint loaded at TP=2 gives the one-process loaded curve (fp32)."""
    root, _, _ = single
    load = str(root / "plain" / "checkpoints")
    one = write(tmp_path / "one.yaml", base_config(tmp_path / "one", data, train_steps=3, load=load))
    proc = subprocess.run([sys.executable, str(LAYOUTS), one], env=torchrun_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = write(tmp_path / "tp2.yaml", base_config(tmp_path / "tp2", data, train_steps=3, load=load,
                                                   **{"parallel.tp": 2}))
    proc = run_torchrun(2, str(LAYOUTS), tp2, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "tp2")
    for step in (1, 2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (step, a[step], b[step])


def test_sigterm_saves_stops_and_resumes_the_curve(tmp_path, data):
    """Slurm preempts by sending SIGTERM to every process of the step: torchrun and its workers.
    The workers finish the step they are in, agree to stop, save, and exit; rerunning the same
    command resumes and its remaining steps equal an uninterrupted run's bit for bit."""
    steps = 12
    reference = write(tmp_path / "ref.yaml", base_config(tmp_path / "ref", data, train_steps=steps))
    proc = run_torchrun(2, str(LAUNCH), "--config", reference, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    out = tmp_path / "preempted"
    path = write(tmp_path / "preempted.yaml", base_config(out, data, train_steps=steps))
    log = signal_run_at_step(path, out, 2, signal.SIGTERM)
    stopped_at = max(metrics(out))
    assert 2 <= stopped_at < steps, log[-3000:]
    assert f"SIGTERM: saved step {stopped_at}, stopping" in log, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"

    resumed = run_torchrun(2, str(LAUNCH), "--config", path, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"at step {stopped_at}" in resumed.stdout
    after, uninterrupted = metrics(out), metrics(tmp_path / "ref")
    assert sorted(after) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert after[step][key] == uninterrupted[step][key], (step, key, after[step], uninterrupted[step])


def test_the_checkpoint_writers_results_queue_survives_sigterm():
    """Slurm's preemption sends SIGTERM to every process of a job step. megatron's checkpoint
    writer collects results through a Manager queue whose server is such a process: its own
    queue dies of the SIGTERM (the control), the trainer's replacement ignores it, so the
    checkpoint written on SIGTERM can still finish."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from longrope2.train import trainer

    def server_pid(queue) -> int:
        return queue._manager._process.pid

    previous = filesystem_async._results_queue
    try:
        filesystem_async._results_queue = None
        own = filesystem_async._get_write_results_queue()  # megatron's, as its first save makes it
        os.kill(server_pid(own), signal.SIGTERM)
        own._manager._process.join(10)
        with pytest.raises((EOFError, ConnectionError, BrokenPipeError)):
            own.put("lost")

        filesystem_async._results_queue = None
        trainer._preemption_safe_checkpoint_writer()
        safe = filesystem_async._get_write_results_queue()
        os.kill(server_pid(safe), signal.SIGTERM)
        time.sleep(1)
        safe.put("kept")
        assert safe.get(timeout=10) == "kept"
    finally:
        filesystem_async._results_queue = previous


_START_QUEUE_AND_WAIT = """
import sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
if sys.argv[1] == "trainer":
    from longrope2.train import trainer
    trainer._preemption_safe_checkpoint_writer()
queue = filesystem_async._get_write_results_queue()
print(queue._manager._process.pid, flush=True)
time.sleep(600)
"""


def _server_outlives_a_killed_parent(kind: str) -> bool:
    """Start the writer's queue in a child process, SIGKILL the child, and report whether the
    queue's server process is still alive 10 s later (it is then killed)."""
    proc = subprocess.Popen([sys.executable, "-c", _START_QUEUE_AND_WAIT, kind], stdout=subprocess.PIPE, text=True)
    server = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{server}/stat").read_text().split()[2] == "Z":  # exited, not yet reaped by init
                return False
        except FileNotFoundError:  # exited and reaped
            return False
        time.sleep(0.2)
    os.kill(server, signal.SIGKILL)
    return True


def test_the_checkpoint_writers_queue_server_dies_with_its_killed_rank():
    """A rank killed outright (SIGKILL, OOM) must leave no process behind: megatron's own queue
    server is orphaned and lives on (the control), the trainer's, which ignores SIGTERM, dies
    with its parent."""
    assert _server_outlives_a_killed_parent("megatron")
    assert not _server_outlives_a_killed_parent("trainer")
