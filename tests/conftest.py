import os

# Each test process gets one thread: on 2-core machines two threads per process under load
# was up to 50x slower (DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
