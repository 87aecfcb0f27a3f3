"""Initializers for helper processes the trainer starts (stdlib only: a spawned child imports
this module to unpickle them, and should not pay for torch or megatron)."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ignore_sigterm_and_die_with_parent() -> None:
    """SIGTERM ignored (Slurm's preemption signals every process of the step, and this helper must
    outlive the checkpoint written on SIGTERM); SIGKILL when the parent dies, so that a rank killed
    outright leaves no orphan behind (Slurm's linuxproc/pgid tracking does not see orphans)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
