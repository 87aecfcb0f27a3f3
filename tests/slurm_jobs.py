"""Submitting and watching jobs on the local Slurm clusters of the tests (scripts/local_slurm.sh)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path


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
