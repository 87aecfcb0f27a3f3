"""Run several training configs one after another in the same processes (megatron's import and
the process group are paid once): ``torchrun --nproc_per_node 2 train_layouts.py A.yaml B.yaml``,
or plain ``python train_layouts.py A.yaml`` for one process. Each run writes its own
``metrics.jsonl``; tests/test_train.py compares them."""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from longrope2.train.config import TrainConfig
from longrope2.train.trainer import train


def main(paths: list[str]) -> int:
    torch.set_num_threads(1)
    if "MASTER_ADDR" not in os.environ:  # one process without torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for path in paths:
        config = TrainConfig.from_yaml(path)
        config.check(dist.get_world_size())
        train(config)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
