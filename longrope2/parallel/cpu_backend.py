"""Runtime shims that let megatron-core run on CPU with gloo (tests, CPU runs of the pipeline).

megatron-core assumes CUDA in a handful of places that have nothing to do with the math: device
placement, the CUDA RNG tracker, ``Tensor.type()`` checks and synchronisation. On a CPU-only
torch build ``enable_cpu_backend()`` maps them to the CPU. Nothing in site-packages is edited;
every shim is installed at run time, here and only here, and each names the megatron call that
needs it (found by removing it and running tests/distributed/worker.py). The shims are
process-wide and stay on; ``initialize_parallel`` installs them only when CUDA is absent.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a GPU


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to the CPU inside every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            # rope_utils.get_pos_emb_on_this_cp_rank: `torch.tensor(...).cuda(non_blocking=True)`
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # DistributedOptimizer._build_model_and_main_param_groups (and Float16Optimizer,
            # clip_grads): `param.type() == "torch.cuda.FloatTensor"` or TypeError
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            # transformer.utils.get_default_causal_mask, schedules' `total_num_tokens`: device="cuda"
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            # rope_utils.get_pos_emb_on_this_cp_rank: `torch.tensor(..., pin_memory=True)`
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


def _get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def enable_cpu_backend() -> None:
    """Install the CPU shims (idempotent). Call before building megatron modules."""
    global _ENABLED
    if _ENABLED:
        return
    from megatron.core.tensor_parallel import random as mp_random

    # The CUDA RNG tracker runs on the CPU generator, the only one there is:
    # model_parallel_cuda_manual_seed -> CudaRNGStatesTracker.add seeds with torch.cuda.manual_seed,
    # which a CPU build queues and never runs (every tracker state would be the unseeded default)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # CudaRNGStatesTracker.add reads torch.cuda.get_rng_state (raises without CUDA)
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    # CudaRNGStatesTracker.fork (dropout, CPU-side init) swaps states through these two; the
    # stock setter defers through torch.cuda._lazy_call, which a CPU build silently drops
    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state
    # GlobalMemoryBuffer.get_tensor (DotProductAttention), p2p and DDP buffers:
    # `device=torch.cuda.current_device()`
    torch.cuda.current_device = lambda: "cpu"
    # p2p_communication._communicate (pipeline send/recv) calls torch.cuda.synchronize()
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpuMode().__enter__()  # never exited: the mode stays on for the process
    _ENABLED = True


def cpu_backend_enabled() -> bool:
    return _ENABLED
