"""torchrun entry point of the LongRoPE2 search.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 launch/search.py --config configs/search/tiny.yaml
    torchrun --nnodes 8 --nproc_per_node 8 ... launch/search.py --config ... --resume
"""

import sys

from longrope2.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
