"""The parallel layout (TP x PP x CP x DP), its checks, and process-group set-up.

A *worker* is one model-parallel group of ``tp * pp * cp`` ranks; ``dp`` such workers fill the
world. Megatron-core owns the groups (``parallel_state``); this module only validates the
layout, starts torch.distributed with the right backend and seeds megatron's RNG tracker.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

_OWNS_PROCESS_GROUP = False


def default_device() -> torch.device:
    """The one place the device is chosen: this rank's GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(kw_only=True)
class ParallelDims:
    """Tensor, pipeline, context and data parallel sizes; ``dp`` is what the world leaves."""

    tp: int = 1
    """Tensor parallel size: splits heads, query groups, the MLP and the vocabulary."""
    pp: int = 1
    """Pipeline parallel size: splits the layers into equal stages."""
    cp: int = 1
    """Context parallel size: splits the sequence into ``2 * cp`` load-balanced chunks."""
    world_size: Optional[int] = None
    """All ranks; ``None`` reads the initialized process group or ``WORLD_SIZE`` (else 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (needs ``tp > 1``)."""
    dp: int = field(init=False)
    """Data parallel size, ``world_size / (tp * pp * cp)``."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.world_size is None:
            self.world_size = _world_size_from_env()
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        self.dp = self.world_size // model_parallel

    @property
    def model_parallel_size(self) -> int:
        """Ranks in one worker (one model replica)."""
        return self.tp * self.pp * self.cp

    @property
    def seq_len_divisor(self) -> int:
        """Every sequence length must be a multiple of this: ``2 * cp`` chunks under context
        parallelism (megatron's load-balanced split), times ``tp`` with sequence parallelism."""
        cp_part = 2 * self.cp if self.cp > 1 else 1
        return cp_part * (self.tp if self.sequence_parallel else 1)

    def validate(self, model: Any = None, seq_len: Optional[int] = None) -> "ParallelDims":
        """Check the layout against a model (a ``ModelConfig``) and a sequence length; raises
        ``ValueError`` naming the sizes that do not divide."""
        if model is not None:
            for name, label in (("num_attention_heads", "attention heads"), ("num_query_groups", "query groups"),
                                ("vocab_size", "vocab size")):
                value = getattr(model, name)
                if value % self.tp:
                    hint = " (pad the vocabulary to a multiple of tp)" if name == "vocab_size" else ""
                    raise ValueError(f"{label} {value} not divisible by tp={self.tp}{hint}")
            if model.num_layers % self.pp:
                raise ValueError(f"layers {model.num_layers} not divisible by pp={self.pp}")
        if seq_len is not None and seq_len % self.seq_len_divisor:
            parts = [f"2*cp={2 * self.cp}"] if self.cp > 1 else []
            if self.sequence_parallel:
                parts.append(f"tp={self.tp} (sequence parallel)")
            raise ValueError(
                f"sequence length {seq_len} not divisible by {self.seq_len_divisor} ({' x '.join(parts)})"
            )
        return self


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(dims: ParallelDims, backend: Optional[str] = None, seed: int = 1234,
                        timeout_minutes: float = 30) -> ParallelDims:
    """Start torch.distributed (gloo on CPU, nccl on GPU), megatron's process groups and its
    RNG tracker. Under torchrun the rendezvous comes from the environment; a single process
    without one gets a private TCP store on a free port."""
    global _OWNS_PROCESS_GROUP
    device = default_device()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs: dict[str, Any] = {}
        if "MASTER_ADDR" not in os.environ:
            if dims.world_size != 1:
                raise ValueError(f"world_size {dims.world_size} needs a launcher (torchrun) that sets MASTER_ADDR")
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
        _OWNS_PROCESS_GROUP = True
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"ParallelDims says world_size {dims.world_size}, the process group has {dist.get_world_size()}")
    if device.type == "cpu":
        from longrope2.parallel.cpu_backend import enable_cpu_backend

        enable_cpu_backend()

    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    # required even without dropout: megatron's parallel layers fork the tracker at init
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dims


def destroy_parallel() -> None:
    """Tear down megatron's groups, and the process group if ``initialize_parallel`` made it."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
