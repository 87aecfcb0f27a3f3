"""torchrun entry point of ``longrope2 eval``: each rank holds a model replica and evaluates its
share of the cells (eval/run.py); rank 0 merges and reports.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 launch/eval.py --config configs/eval/smollm2_ruler_4k.yaml
    torchrun --nnodes 4 --nproc_per_node 8 ... launch/eval.py --config ...   (a rerun resumes, any world size)
"""

import sys

from longrope2.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
