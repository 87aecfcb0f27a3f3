"""Launching torchrun from tests: a free loopback port, one thread per rank, a time limit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_torchrun(nproc: int, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Like ``subprocess.run``, but a timeout kills the workers too, not only torchrun (its own
    session, killed as a group), so a hung collective never outlives the test."""
    cmd = torchrun_command(nproc, script, *args)
    proc = subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_checks(nproc: int, worker: str, out, *args: str, timeout: float = 300) -> dict:
    """Run a check worker (tests/distributed/checks.py) and collect every rank's results, also
    when it failed or timed out (``checked`` then reports which check and why)."""
    import json
    from pathlib import Path

    try:
        proc = run_torchrun(nproc, worker, "--out", str(out), *args, timeout=timeout)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, log = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    per_rank = []
    for rank in range(nproc):
        path = Path(out) / f"rank{rank}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    return {"ranks": per_rank, "returncode": returncode, "log": log}


def checked(results: dict, name: str) -> list:
    """Each rank's result for check ``name``; fails with the worker's traceback if it raised."""
    import pytest

    found = []
    for rank, checks in enumerate(results["ranks"]):
        entry = checks.get(name)
        if entry is None:
            log = "\n".join(line for line in results["log"].splitlines() if "warn" not in line.lower())
            pytest.fail(f"check {name!r} did not run on rank {rank} (torchrun: {results['returncode']})\n{log[-4000:]}")
        if not entry["ok"]:
            pytest.fail(f"check {name!r} raised on rank {rank}:\n{entry['error']}")
        found.append(entry["result"])
    return found


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in their own sessions)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a killed one's is empty)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, as a node failure would (a kill of the process
    group misses torchrun's workers: they run in their own sessions). The tree is frozen first:
    SIGSTOP to every process found, again until a scan finds no new one, so that a process
    started while the tree is being listed (the pipeline launching its next stage's torchrun)
    is caught too rather than orphaned and left running."""
    stopped: list[int] = []
    todo = [pid]
    while todo:
        for p in todo:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.append(p)
        todo = [p for p in descendants(pid) if p not in stopped]
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
