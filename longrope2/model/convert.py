"""HF checkpoints <-> megatron-core distributed checkpoints, streamed tensor by tensor.

* ``import_hf``: every rank builds its ``GPTModel`` shard (any TP x PP layout), fills it one
  parameter at a time from the HF source, reading only its own rows/columns of each safetensors
  tensor (``safe_open(...).get_slice``), and ``dist_checkpointing.save`` writes
  ``{"model": model.sharded_state_dict()}``: exactly what the train config's ``load:`` reads, at
  any layout. The HF config, generation config and tokenizer files go to ``<output>/hf/`` so an
  export finds them again. A ``.gguf`` (or ``smollm2``) source is de-quantized whole by
  transformers (it is small).
* ``export_hf``: every rank builds its shard at the current layout and ``dist_checkpointing.load``s
  it; then, one parameter at a time, the owning stage gathers it over TP to its TP rank 0, which
  sends it to global rank 0, which maps it to HF names (``hf_convert``) and appends it to the
  current safetensors shard, written out once it reaches ``max_shard_size``. Peak memory on rank
  0 is its own model shard plus one safetensors shard. The config carries the ``longrope`` rope
  parameters (``RopeScaling.to_hf_config``) and ``max_position_embeddings`` = the target.

The HF <-> megatron key and layout map lives in ``hf_convert``; this module only moves tensors.
Both run in one process or under torchrun with world size = tp x pp (``run_convert``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from longrope2.model.config import ModelConfig
from longrope2.model.hf_convert import (
    _uses_te_norms,
    check_hf_keys,
    hf_from_megatron,
    is_fused,
    load_hf_into_megatron,
    mapping_reader,
    megatron_keys,
    megatron_shape,
    reference_key,
    tp_unshard,
)
from longrope2.rope.scaling import RopeScaling

HF_META = "hf"
"""Sub-folder of an imported checkpoint with the source's config, generation config, tokenizer."""
SUPPORTED = ("LlamaForCausalLM", "Phi3ForCausalLM", "MistralForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                "vocab_size", "rope_theta", "rotary_percent", "tie_word_embeddings")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# --- HF sources ------------------------------------------------------------------------------


class SafetensorsSource:
    """An HF folder's safetensors (one file or an index), read lazily: ``read`` returns only
    the requested rows/columns of a tensor."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in folder.iterdir())
                raise FileNotFoundError(f"{folder} has no *.safetensors weights (found {found}); "
                                        f"PyTorch .bin checkpoints are not supported, re-save with safe_serialization")
            weight_map = {}
        self.files = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}, listed in {index.name}, is missing")
            self.files[name] = safe_open(str(path), framework="pt")
            if not index.is_file():
                weight_map.update({k: name for k in self.files[name].keys()})
        self.weight_map = weight_map

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.files[f].get_slice(k).get_shape()) for k, f in self.weight_map.items()}

    def dtype(self, key: str) -> torch.dtype:
        name = self.files[self.weight_map[key]].get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"{key} is stored as {name}; only float32/bfloat16/float16 checkpoints convert")
        return _DTYPES[name]

    def read(self, key: str, rows=None, cols=None) -> torch.Tensor:
        part = self.files[self.weight_map[key]].get_slice(key)
        if rows is not None:
            return part[rows[0]:rows[1]]
        if cols is not None:
            return part[:, cols[0]:cols[1]]
        return part[:]


def _hf_config_dict(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an HF model folder: config.json is missing")
    return json.loads(path.read_text())


def check_architecture(hf_config: dict[str, Any]) -> None:
    arch = (hf_config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"architecture {arch} is not supported; the converter handles {SUPPORTED}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"{flag}=true is not supported (LLaMA-style models without biases only)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config['hidden_act']!r} is not supported (SwiGLU with silu only)")


def check_same_architecture(ours: ModelConfig, theirs: ModelConfig, what: str) -> None:
    """Raise listing every architecture field where ``ours`` and ``theirs`` differ."""
    diff = [f"{f} {getattr(ours, f)} vs {getattr(theirs, f)}" for f in _ARCH_FIELDS
            if getattr(ours, f) != getattr(theirs, f)]
    if is_fused(ours) != is_fused(theirs):
        diff.append(f"hf_architecture {ours.hf_architecture} vs {theirs.hf_architecture}")
    if diff:
        raise ValueError(f"architecture mismatch between model {ours.name!r} and {what}: " + "; ".join(diff))


def _open_source(source: str | Path):
    """(reader, shapes, dtype, hf_config dict, writer of the metadata folder) for a folder,
    a ``.gguf`` file or ``smollm2``."""
    from longrope2.model.pretrained import smollm2_gguf_path

    path = smollm2_gguf_path() if str(source) == "smollm2" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no HF checkpoint at {path}")
    if path.suffix == ".gguf":
        from longrope2.model.pretrained import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(path)
        state = model.state_dict()
        hf_config = json.loads(model.config.to_json_string())

        def write_meta(folder: Path) -> None:
            model.config.to_json_file(str(folder / "config.json"))
            if model.generation_config is not None:
                model.generation_config.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))

        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return mapping_reader(state), shapes, state["model.embed_tokens.weight"].dtype, hf_config, write_meta
    hf_config = _hf_config_dict(path)
    src = SafetensorsSource(path)

    def write_meta(folder: Path) -> None:
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (path / name).is_file():
                shutil.copy2(path / name, folder / name)

    return src.read, src.shapes(), src.dtype("model.embed_tokens.weight"), hf_config, write_meta


# --- import ------------------------------------------------------------------------------------


def import_hf(source: str | Path, output: str | Path, model: Optional[ModelConfig] = None,
              dtype: Optional[torch.dtype] = None, progress: bool = True) -> ModelConfig:
    """Convert an HF checkpoint into a megatron distributed checkpoint at ``output``, at the
    current megatron layout (``initialize_parallel`` first). ``model`` (a preset) is checked
    against the HF config; ``dtype`` defaults to the source's. Returns the model config."""
    from megatron.core import dist_checkpointing

    from longrope2.model.gpt import build_gpt_model

    output = Path(output)
    if output.exists() and any(output.iterdir()):  # every rank: none may reach a collective
        raise FileExistsError(f"output {output} exists and is not empty")
    read, shapes, source_dtype, hf_config, write_meta = _open_source(source)
    check_architecture(hf_config)
    cfg = ModelConfig.from_hf_config(hf_config, name=Path(str(source)).stem)
    if model is not None:
        check_same_architecture(model, cfg, f"HF checkpoint {source}")
        cfg = model
    check_hf_keys(shapes, cfg, f"HF checkpoint {source}")
    dtype = dtype or source_dtype
    gpt = build_gpt_model(cfg, params_dtype=dtype, initialize=False)
    load_hf_into_megatron(gpt, read, cfg, progress=progress)
    if _rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": gpt.sharded_state_dict()}, str(output))
    dist.barrier()
    if _rank() == 0:  # after the save: megatron warns about non-empty checkpoint folders
        (output / HF_META).mkdir()
        write_meta(output / HF_META)
    dist.barrier()
    return cfg


# --- export ------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A dist checkpoint folder, or a training run's (``latest`` or ``checkpoints/latest``)."""
    path = Path(path)
    for latest in (path / "latest", path / "checkpoints" / "latest"):
        if latest.is_file():
            path = latest.parent / latest.read_text().strip()
            break
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron distributed checkpoint (no metadata.json)")
    try:
        json.loads((path / "metadata.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}/metadata.json is not valid JSON ({error}): a corrupt or partly written "
                         "checkpoint") from None
    return path


def _checked_metadata(checkpoint: Path, model) -> torch.dtype:
    """Every sharded tensor of ``model`` is in the checkpoint with the same global shape (the
    key named otherwise); returns the checkpoint's dtype."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    sharded, _ = extract_sharded_base(model.sharded_state_dict())
    for item in sharded.values():
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in meta:
            raise KeyError(f"checkpoint {checkpoint} has no tensor {item.key} (a different architecture or layer count?)")
        if tuple(meta[item.key].global_shape) != tuple(item.global_shape):
            raise ValueError(f"checkpoint {checkpoint}: {item.key} has global shape {tuple(meta[item.key].global_shape)}, "
                             f"the model config says {tuple(item.global_shape)}")
    return meta["embedding.word_embeddings.weight"].dtype


def checkpoint_dtype(checkpoint: str | Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(resolve_checkpoint(checkpoint)))
    if "embedding.word_embeddings.weight" not in meta:
        raise KeyError(f"{checkpoint} has no embedding.word_embeddings.weight: not a GPTModel checkpoint")
    return meta["embedding.word_embeddings.weight"].dtype


def parse_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    unit = m[2].rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m[1]) * scale)


class ShardWriter:
    """HF safetensors shards written as tensors arrive: ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self._flush()
        self.buffer[key] = tensor.detach().to("cpu").contiguous().clone()  # no shared storage in a file
        self.buffered += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buffer, str(self.folder / f".part{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[str]:
        if self.buffer or not self.files:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f".part{i:05d}.safetensors").replace(self.folder / name)
        if n > 1:
            weight_map = {key: name for name, keys in zip(names, self.files) for key in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _owners(model, te_norms: bool) -> dict[str, int]:
    """Full-model key -> the global rank that sends it to rank 0 (TP rank 0 of its stage)."""
    from megatron.core import parallel_state as ps

    mine = [reference_key(model, n) for n, _ in model.named_parameters()
            if not (n == "output_layer.weight" and model.share_embeddings_and_output_weights)]
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (dist.get_rank(), ps.get_tensor_model_parallel_rank(), mine))
    owners = {}
    for rank, tp_rank, keys in sorted(entries):
        for key in keys:
            if tp_rank == 0:
                owners.setdefault(key, rank)
    return owners


def iter_full_parameters(model, cfg: ModelConfig, progress: bool = True):
    """Yield ``(key, full tensor)`` on global rank 0 (``(key, None)`` elsewhere) for every
    parameter of the full model, in HF order, gathering one at a time over TP and PP."""
    from megatron.core import parallel_state as ps

    te_norms = _uses_te_norms(dict(model.named_parameters()))
    owners = _owners(model, te_norms)
    local = {reference_key(model, n): p for n, p in model.named_parameters()
             if not (n == "output_layer.weight" and model.share_embeddings_and_output_weights)}
    tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    tp_src = dist.get_global_rank(tp_group, 0) if tp_size > 1 else dist.get_rank()
    rank = dist.get_rank()
    keys = megatron_keys(cfg, te_norms)
    missing = [k for k in keys if k not in owners]
    if missing:
        raise KeyError(f"no rank holds {missing[:3]} (model built for another architecture?)")
    if progress:
        from tqdm import tqdm

        keys = tqdm(keys, desc="export", unit="tensor", disable=rank != 0)
    for key in keys:
        full = None
        if key in local:
            shard = local[key].detach().contiguous()
            if tp_size > 1:
                parts = [torch.empty_like(shard) for _ in range(tp_size)] if rank == tp_src else None
                dist.gather(shard, parts, dst=tp_src, group=tp_group)
                full = tp_unshard(key, parts) if parts is not None else None
            else:
                full = shard
        src = owners[key]
        if src != 0:
            if rank == src:
                dist.send(full.contiguous(), dst=0)
            elif rank == 0:
                dtype = next(iter(local.values())).dtype
                full = torch.empty(megatron_shape(key, cfg), dtype=dtype, device=next(iter(local.values())).device)
                dist.recv(full, src=src)
        if rank == 0 and tuple(full.shape) != megatron_shape(key, cfg):
            raise ValueError(f"{key}: gathered {tuple(full.shape)}, expected {megatron_shape(key, cfg)}")
        yield key, (full if rank == 0 else None)


def export_hf_config(cfg: ModelConfig, base: Optional[dict[str, Any]], scaling: Optional[RopeScaling],
                     dtype: torch.dtype, style: str = "rope_parameters") -> dict[str, Any]:
    """config.json: the source's (or the preset's) fields, the longrope rope parameters and
    ``max_position_embeddings`` = the target when ``scaling`` is given, and the dtype."""
    out = dict(base) if base else cfg.to_hf_config()
    if base:
        check_same_architecture(cfg, ModelConfig.from_hf_config(base), "the HF config")
    if scaling is not None:
        if scaling.rotary_dim != cfg.rotary_dim or scaling.rope_theta != cfg.rope_theta:
            raise ValueError(f"rope scaling for rotary dim {scaling.rotary_dim} / base {scaling.rope_theta}, the model "
                             f"has {cfg.rotary_dim} / {cfg.rope_theta}")
        if scaling.attention_factor is None:  # pinned: readers other than transformers may default differently
            scaling = dataclasses.replace(scaling, attention_factor=scaling.resolved_attention_factor)
        old = out.pop("rope_parameters", None) or out.pop("rope_scaling", None) or {}
        out.pop("rope_scaling", None)
        fields = scaling.to_hf_config(style)
        if cfg.rotary_percent != 1.0:  # Phi3Config reads it top-level or inside rope_parameters
            out["partial_rotary_factor"] = cfg.rotary_percent
            if style == "rope_parameters":
                fields["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
        elif "partial_rotary_factor" in old and style == "rope_parameters":
            fields["rope_parameters"]["partial_rotary_factor"] = old["partial_rotary_factor"]
        out.update(fields)
    name = str(dtype).removeprefix("torch.")
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    return out


def export_hf(checkpoint: str | Path, output: str | Path, cfg: ModelConfig, scaling: Optional[RopeScaling] = None,
              hf_meta: Optional[str | Path] = None, style: str = "rope_parameters",
              max_shard_size: str | int = "5GB", dtype: Optional[torch.dtype] = None, progress: bool = True,
              tokenizer: Optional[str | Path] = None) -> Path:
    """Write an HF folder (safetensors, config.json, generation config, tokenizer files) from a
    megatron distributed checkpoint, at the current megatron layout. ``hf_meta`` is an HF folder
    (default: ``<checkpoint>/hf`` written by ``import_hf``) whose config and tokenizer are kept;
    ``tokenizer``, an HF tokenizer folder whose files are copied instead (a model trained here
    from scratch, with a tokenizer from ``prepare-data --train-tokenizer``)."""
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"tokenizer folder {tokenizer} has no tokenizer_config.json")
    from megatron.core import dist_checkpointing

    from longrope2.model.gpt import build_gpt_model

    checkpoint = resolve_checkpoint(checkpoint)
    output = Path(output)
    if output.exists() and any(output.iterdir()):  # every rank: none may reach a collective
        raise FileExistsError(f"output {output} exists and is not empty")
    if hf_meta is None and (checkpoint / HF_META / "config.json").is_file():
        hf_meta = checkpoint / HF_META
    base = _hf_config_dict(Path(hf_meta)) if hf_meta is not None else None
    stored = checkpoint_dtype(checkpoint)
    model = build_gpt_model(cfg, params_dtype=stored, initialize=False)
    _checked_metadata(checkpoint, model)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(state["model"])
    del state
    dtype = dtype or stored
    config = export_hf_config(cfg, base, scaling, dtype, style)  # raises before any file is written
    writer = None
    if _rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(output, parse_size(max_shard_size))
    for key, full in iter_full_parameters(model, cfg, progress):
        if writer is not None:
            for hf_key, tensor in hf_from_megatron(key, full, cfg):
                writer.add(hf_key, tensor.to(dtype))
    if writer is not None:
        writer.close()
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if hf_meta is not None:
            for name in ("generation_config.json", *TOKENIZER_FILES):
                if (Path(hf_meta) / name).is_file() and not (tokenizer is not None and name in TOKENIZER_FILES):
                    shutil.copy2(Path(hf_meta) / name, output / name)
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    shutil.copy2(Path(tokenizer) / name, output / name)
        if not (output / "generation_config.json").is_file():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (output / "generation_config.json").write_text(json.dumps({**gen, "_from_model_config": True}, indent=2) + "\n")
    dist.barrier()
    return output


# --- model config and rope factors for the command line --------------------------------------


def resolve_model(spec: Optional[str], checkpoint: Optional[Path] = None) -> tuple[ModelConfig, Optional[Path]]:
    """A ``ModelConfig`` from a preset name, a model YAML, or an HF folder / config.json (also
    returned, as the metadata source); with no ``spec``, ``<checkpoint>/hf``."""
    if spec is None:
        meta = checkpoint / HF_META if checkpoint is not None else None
        if meta is None or not (meta / "config.json").is_file():
            raise ValueError(f"give --model (preset, model YAML or HF folder): {checkpoint} has no {HF_META}/config.json")
        spec = str(meta)
    path = Path(spec)
    if path.is_dir() or path.suffix == ".json":
        folder = path if path.is_dir() else path.parent
        config = _hf_config_dict(folder)
        check_architecture(config)
        return ModelConfig.from_hf_config(config, name=folder.name), folder
    if path.suffix in (".yaml", ".yml"):
        return ModelConfig.from_yaml(path), None
    return ModelConfig.from_name(spec), None


def resolve_rope(spec: str, cfg: ModelConfig, target_length: Optional[int] = None,
                 attention_factor: Optional[float] = None) -> RopeScaling:
    """The export's ``RopeScaling`` from a search ``best.json`` (its ``target_length``), an HF
    config / ``rope_config.json``, a JSON list of long factors, or a train config YAML (its
    ``rope`` section), by ``RopeScaling.from_file``'s rules (the factor count must be rotary_dim / 2)."""
    from longrope2.train.config import TrainConfig

    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--rope: {path} not found")
    if path.suffix in (".yaml", ".yml"):
        run = TrainConfig.from_yaml(path)
        if run.rope is not None and (target_length is not None or attention_factor is not None):
            run.rope.target_length = target_length or run.rope.target_length
            run.rope.attention_factor = attention_factor if attention_factor is not None else run.rope.attention_factor
        return run.rope_scaling(cfg)
    return RopeScaling.from_file(path, cfg.rope_geometry, target_length, attention_factor)


# --- command line (one process or torchrun) ---------------------------------------------------


def run_convert(args) -> int:
    """``longrope2 convert import-hf|export-hf``: initialize the layout (world size = tp x pp),
    convert, tear down."""
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.tp < 1 or args.pp < 1 or args.tp * args.pp != world:
            raise ValueError(f"--tp {args.tp} x --pp {args.pp} needs {args.tp * args.pp} processes "
                             f"(torchrun --nproc_per_node {max(args.tp * args.pp, 1)}); this run has {world}")
        if args.action == "import-hf":
            preset = resolve_model(args.model)[0] if args.model else None
            dims = ParallelDims(tp=args.tp, pp=args.pp, cp=1)
            if dims.dp != 1:
                raise ValueError(f"world size {dims.world_size} must equal tp*pp = {args.tp * args.pp}")
            initialize_parallel(dims)
            try:
                cfg = import_hf(args.hf, args.output, preset, dtypes[args.dtype])
            finally:
                destroy_parallel()
            if _rank() == 0:
                print(f"{args.hf} -> {args.output} ({cfg.num_parameters():,} parameters, tp={args.tp} pp={args.pp}); "
                      f"use it as a train config's `load:`")
            return 0
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg, meta = resolve_model(args.model, checkpoint)
        scaling = resolve_rope(args.rope, cfg, args.target_length, args.attention_factor) if args.rope else None
        dims = ParallelDims(tp=args.tp, pp=args.pp, cp=1)
        if dims.dp != 1:
            raise ValueError(f"world size {dims.world_size} must equal tp*pp = {args.tp * args.pp}")
        initialize_parallel(dims)
        try:
            export_hf(checkpoint, args.output, cfg, scaling, meta, args.rope_style, args.max_shard_size,
                      dtypes[args.dtype], tokenizer=args.tokenizer)
        finally:
            destroy_parallel()
        if _rank() == 0:
            window = (f"longrope {scaling.original_max_position_embeddings} -> {scaling.max_position_embeddings}"
                      if scaling else "original RoPE")
            print(f"{checkpoint} -> {args.output} (HF {cfg.hf_architecture}, {window})")
        return 0
    except KeyError as error:  # a tensor or config key the other side lacks: input, not a bug
        raise ValueError(str(error.args[0]) if error.args else repr(error)) from None
