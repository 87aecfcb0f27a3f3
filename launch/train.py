"""Mixed context window training: ``torchrun --nproc_per_node N launch/train.py --config X.yaml``.

Thin on purpose: parse the config, check it (clear errors before any process group exists),
build the trainer, train, and close whether training succeeds or fails. The loop lives in
``longrope2/train/trainer.py``; the same flow is ``longrope2 train --config X.yaml``.

``--dry-run [--nodes N --gpus-per-node G]`` prints the layout, micro-batch plan and per-GPU
memory estimate (``longrope2/train/plan.py``) and exits without building anything.
"""

from __future__ import annotations

import argparse
import os
import sys

from longrope2.train.config import TrainConfig
from longrope2.train.plan import add_dry_run_args, dry_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    add_dry_run_args(parser)
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run("train", args)
    try:
        config = TrainConfig.from_yaml(args.config)
        config.check(int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from longrope2.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
