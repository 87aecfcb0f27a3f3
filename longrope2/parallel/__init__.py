"""Process groups, the parallel layout and device choice; the CPU (gloo) backend lives here."""

from longrope2.parallel.layout import ParallelDims, default_device, destroy_parallel, initialize_parallel

__all__ = ["ParallelDims", "default_device", "destroy_parallel", "initialize_parallel"]
