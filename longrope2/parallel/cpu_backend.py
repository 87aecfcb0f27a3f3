"""Runtime shims that let megatron-core run on CPU with gloo (tests, the embedded default).

megatron-core assumes CUDA in a handful of places that have nothing to do with the math:
device placement, the CUDA RNG tracker, ``Tensor.type()`` checks and stream/sync calls. On a
CPU-only torch build ``enable_cpu_backend()`` maps those to the CPU. Nothing in site-packages is
edited; every shim is installed at run time, here and only here, and each names the megatron
call that needs it. On a machine with a GPU none of this is used (``initialize_parallel``
enables it only when CUDA is absent).
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


def _cpu_type_name(name: str) -> str:
    return name.replace("torch.cuda.", "torch.")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to the CPU inside every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            # megatron: `.cuda()` on buffers, losses and p2p shapes (schedules, optimizer, DDP)
            return args[0]
        if func is torch.Tensor.pin_memory:
            # megatron: pinned host copies for offloading/checkpoints; no pinned memory without CUDA
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                # megatron: schedules, optimizer and clip_grads assert `t.type() == "torch.cuda.FloatTensor"`
                return _cpu_type_name(func(*args)).replace("torch.", "torch.cuda.", 1)
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], _cpu_type_name(args[1]), *args[2:])
        if func is torch.Tensor.to:
            # megatron: `.to(torch.cuda.current_device())`, `.to("cuda")` for batches and states
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            # megatron: `torch.empty(..., device=torch.cuda.current_device())` across all modules
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            # megatron: DDP/optimizer host buffers created with `pin_memory=True`
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def enable_cpu_backend() -> None:
    """Install the CPU shims (idempotent). Call before building megatron modules."""
    global _ENABLED
    if _ENABLED:
        return
    from megatron.core.tensor_parallel import random as mp_random

    # the CUDA RNG tracker (model_parallel_cuda_manual_seed, tracker.add/fork for init and
    # dropout) runs on the CPU generator: there is no other generator on a CPU machine
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    # megatron: `device=torch.cuda.current_device()` in every parallel module and buffer
    torch.cuda.current_device = lambda: "cpu"
    # megatron: schedules/optimizer/timers synchronize around collectives
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpuMode().__enter__()
    _ENABLED = True


def cpu_backend_enabled() -> bool:
    return _ENABLED
