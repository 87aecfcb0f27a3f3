"""The run config of mixed context window training: dataclass sections loaded strictly from YAML
(``longrope2.configs``: unknown keys are errors). ``TrainConfig.check`` runs every check that needs
no process group, before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from longrope2 import configs

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(kw_only=True)
class RopeConfig:
    target_length: int
    """The extended window L_target (HF ``max_position_embeddings`` of the result)."""
    factors: Optional[str] = None
    """A search result (``best.json``: ``long_factor``), an HF config / ``rope_config.json`` with a
    ``longrope`` section, or a JSON list of long factors."""
    method: Optional[str] = None
    """Instead of ``factors``: a factor family by name (pi, ntk, yarn)."""
    attention_factor: Optional[float] = None
    """cos/sin scale; None = the file's, or the method's own."""

    def __post_init__(self) -> None:
        if (self.factors is None) == (self.method is None):
            raise ValueError("rope: give exactly one of `factors` (a best.json / factor file) and `method`")


@dataclass(kw_only=True)
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Indexed dataset prefixes (PREFIX.bin/.idx from ``longrope2 prepare-data``); empty (and no
    ``manifest``) = the embedded books, tokenized with ``tokenizer`` into ``<output_dir>/data``
    on first use."""
    manifest: Optional[str] = None
    """A data mix (``prepare-data --config MIX.yaml``): its folder or manifest.json; its bucket
    datasets are the paths and its short token fraction the default ``short_fraction``."""
    tokenizer: str = "hashed-words:512"
    """For the embedded books only: ``hashed-words:VOCAB``, ``smollm2`` or an HF tokenizer path."""
    min_doc_tokens: int = 32
    """For the embedded books only: their documents' token lengths are log-uniform in this range."""
    max_doc_tokens: int = 4096
    short_fraction: Optional[float] = None
    """Fraction of tokens (= of micro-batches) from short documents packed with the original
    RoPE (paper: 1B of 10B tokens from Fineweb-Edu, plus short documents of the other sources);
    None = the manifest's with ``manifest``, else 0.2."""
    seed: int = 1234
    pad_multiple: Optional[int] = None
    """Pad each packed short document to a multiple of this; None = ``2 * cp`` under context
    parallelism (each CP rank holds 2 of its ``2 cp`` chunks), else 1. Padding changes which
    tokens a short micro-batch holds: set it to compare runs across CP sizes."""

    def __post_init__(self) -> None:
        if self.manifest is not None:
            from longrope2.data.mix import read_mix_manifest

            if self.paths:
                raise ValueError("data: give paths or manifest, not both")
            try:
                self.paths, fraction, _ = read_mix_manifest(self.manifest)
            except FileNotFoundError:  # not built yet (a dry run on a laptop): the launch check says so
                fraction = None
            if self.short_fraction is None:
                self.short_fraction = fraction
        elif self.short_fraction is None:
            self.short_fraction = 0.2
        if self.short_fraction is not None and not 0.0 <= self.short_fraction <= 1.0:
            raise ValueError(f"data.short_fraction must be in [0, 1], got {self.short_fraction}")
        if self.pad_multiple is not None and (not isinstance(self.pad_multiple, int) or self.pad_multiple < 1):
            raise ValueError(f"data.pad_multiple must be a positive int, got {self.pad_multiple!r}")

    def resolved_pad_multiple(self, cp: int) -> int:
        if self.pad_multiple is not None:
            return self.pad_multiple
        return 2 * cp if cp > 1 else 1


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 2e-5
    """Peak learning rate (paper: 2e-5)."""
    min_lr: float = 0.0
    """Cosine floor."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True)
class TrainConfig:
    model: str
    """Model preset (configs/models) or a model YAML."""
    rope: Optional[RopeConfig]
    """The rescaled RoPE of long micro-batches. ``null`` = the original RoPE only, which is
    pre-training at the original window: every micro-batch short (``data.short_fraction: 1``)."""
    output_dir: str
    """Checkpoints (``checkpoints/iter_*``), ``metrics.jsonl``, TensorBoard events, the config."""
    seq_length: int
    """Tokens per micro-batch (every micro-batch, short or long, has exactly this many)."""
    global_batch_size: int
    """Micro-batches (sequences of ``seq_length``) per optimizer step, over all DP ranks; each DP
    rank runs ``global_batch_size / dp`` micro-batches of one sequence (packed for short ones)."""
    train_steps: int
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end and on SIGTERM)."""
    log_interval: int = 1
    dtype: str = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    recompute: bool = False
    """Full activation recompute of every layer (megatron's ``recompute_granularity='full'``)."""
    load: Optional[str] = None
    """Start from this megatron checkpoint directory (weights only) when ``output_dir`` has none."""
    seed: int = 1234
    collective_timeout_s: float = 1800.0
    """A collective (all-reduce, send/recv) that waits longer than this fails the job: a node
    whose link is cut ends the run within this time rather than hanging (torch's default is 30
    minutes). A dead peer whose connection closes fails at once whatever this is."""
    tensorboard: bool = True
    """Write TensorBoard events if ``tensorboard`` is installed (silently skipped otherwise)."""
    peak_tflops: float = 989.0
    """Per-GPU dense peak for MFU (H100 SXM bf16: 989)."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "global_batch_size", "train_steps", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {self.save_interval}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.optim.warmup_steps >= self.train_steps:  # megatron's scheduler asserts it, without a message
            raise ValueError(f"optim.warmup_steps {self.optim.warmup_steps} must be below train_steps {self.train_steps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return configs.load_yaml(cls, path)

    def to_dict(self) -> dict[str, Any]:
        return configs.to_dict(self)

    # --- checks that need no process group ----------------------------------------------------

    def model_config(self):
        from longrope2.model.config import ModelConfig

        if self.model.endswith((".yaml", ".yml")):
            return ModelConfig.from_yaml(self.model)
        return ModelConfig.from_name(self.model)

    def rope_scaling(self, model_cfg):
        """The run's ``RopeScaling``; raises if the factor count is not rotary_dim / 2."""
        from longrope2.rope.scaling import RopeScaling

        rope = self.rope
        if rope is None:
            return None
        geometry = model_cfg.rope_geometry
        if rope.method is not None:
            return RopeScaling.from_method(rope.method, geometry, rope.target_length, rope.attention_factor)
        return RopeScaling.from_file(rope.factors, geometry, rope.target_length, rope.attention_factor)

    def torch_dtype(self, on_gpu: bool):
        import torch

        name = self.dtype if self.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        return getattr(torch, name)

    def parallel_dims(self, world_size: int, model_cfg=None):
        """The layout on ``world_size`` ranks, checked against the model, the sequence length and
        the global batch (what a dry run can check without the run's files)."""
        from longrope2.parallel import ParallelDims

        p = self.parallel
        dims = ParallelDims(tp=p.tp, pp=p.pp, cp=p.cp, sequence_parallel=p.sequence_parallel, world_size=world_size)
        dims.validate(model_cfg or self.model_config(), seq_len=self.seq_length)
        if self.global_batch_size % dims.dp:
            raise ValueError(f"global_batch_size {self.global_batch_size} not divisible by dp={dims.dp}")
        return dims

    def check(self, world_size: int):
        """Every check that needs no process group: layout vs model and sequence length, batch
        split, RoPE factors, data files, the sampler's needs. Returns (dims, model_cfg, scaling)."""
        from longrope2.data.indexed import check_indexed

        model_cfg = self.model_config()
        p = self.parallel
        dims = self.parallel_dims(world_size, model_cfg)
        if self.data.manifest is not None:
            from longrope2.data.mix import read_mix_manifest

            read_mix_manifest(self.data.manifest)  # a clear error if it is not built
        if self.rope is None:
            if self.data.short_fraction != 1.0:
                raise ValueError(f"rope: null (the original RoPE only, pre-training) needs data.short_fraction 1.0, "
                                 f"got {self.data.short_fraction}: long micro-batches use a rescaled RoPE")
        else:
            if self.seq_length <= model_cfg.original_max_position_embeddings:
                raise ValueError(f"seq_length {self.seq_length} must exceed the original window "
                                 f"{model_cfg.original_max_position_embeddings} (or set rope: null and "
                                 "data.short_fraction: 1.0 to pre-train at the original window)")
            if self.rope.target_length < self.seq_length:
                raise ValueError(f"rope.target_length {self.rope.target_length} < seq_length {self.seq_length}")
        if self.data.short_fraction > 0:  # packed short micro-batches (THD), padded per document under CP
            multiple, window = self.data.resolved_pad_multiple(p.cp), model_cfg.original_max_position_embeddings
            if p.cp > 1 and multiple % (2 * p.cp):
                raise ValueError(f"data.pad_multiple {multiple} is not a multiple of 2*cp={2 * p.cp}: under context "
                                 "parallelism every packed document is split into 2*cp chunks")
            if window % multiple:
                raise ValueError(f"original window {window} not divisible by the packed-document multiple {multiple} "
                                 "(data.pad_multiple, default 2*cp): a padded short document could pass the window "
                                 "and get the rescaled RoPE")
            if self.seq_length % multiple:
                raise ValueError(f"seq_length {self.seq_length} not divisible by the packed-document multiple "
                                 f"{multiple} (data.pad_multiple)")
        scaling = self.rope_scaling(model_cfg)
        if self.data.paths:
            check_indexed(self.data.paths)
        if self.load is not None and not Path(self.load).is_dir():
            raise FileNotFoundError(f"load: checkpoint directory {self.load} not found")
        return dims, model_cfg, scaling
