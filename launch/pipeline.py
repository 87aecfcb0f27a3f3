"""The whole LongRoPE2 method from one YAML: ``python launch/pipeline.py --config configs/pipeline/X.yaml``.

Same as ``longrope2 pipeline``; under ``torchrun`` every rank runs it and the distributed stages
run in these processes (``longrope2/pipeline.py``).
"""

import sys

from longrope2.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
