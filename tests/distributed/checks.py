"""The driver every multi-process check worker shares (``torchrun --nproc_per_node N
worker.py --out DIR``): the gloo group is set up once, the checks run one after another in the
same processes (megatron's import is paid once), and after each one this rank's results so far
are rewritten atomically to ``DIR/rank<r>.json`` as ``{label: {ok, result | error, seconds}}``.
The pytest side reads them with ``torchrun.run_checks`` / ``torchrun.checked``."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


def run_checks(checks: Iterable[tuple[str, Callable[[], Any]]], out: str | Path, timeout_s: float = 120) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    path = Path(out) / f"rank{rank}.json"
    results: dict = {}
    for label, fn in checks:
        start = time.perf_counter()
        try:
            entry = {"ok": True, "result": fn()}
        except BaseException:  # SystemExit from a CLI entry point too
            entry = {"ok": False, "error": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results[label] = entry
        path.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
        path.with_suffix(".tmp").replace(path)
        if not entry["ok"]:
            print(f"[rank {rank}] check {label} failed:\n{entry['error']}", file=sys.stderr, flush=True)
            os._exit(1)  # the other ranks may be inside a collective; torchrun stops them
    dist.destroy_process_group()
    return 0
