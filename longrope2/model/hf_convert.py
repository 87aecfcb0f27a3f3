"""HF <-> megatron-core weight mapping for LLaMA-style models (LLaMA, SmolLM2, Phi-3 fused qkv).

The one place that knows both layouts. Everything works one megatron parameter at a time, and on
one tensor-parallel shard of it, so that the converter (``model/convert.py``) can stream: a rank
reads only the HF rows/columns of its own shard (``Reader``), and an export turns one gathered
megatron tensor into its HF entries. Megatron's layouts differ from HF's in two places:

* ``linear_qkv`` rows are grouped per query group ``[q_0..q_{h/g-1}, k, v]`` for each of the
  ``g`` groups (HF: all q rows, then all k, then all v; Phi-3: the same three fused in one
  ``qkv_proj``);
* ``linear_fc1`` is ``[gate; up]`` (HF LLaMA: two matrices; Phi-3: ``gate_up_proj`` already so),
  and a TP rank holds ``[gate_r; up_r]``.

Norm weights sit in ``input_layernorm``/``pre_mlp_layernorm`` in megatron's local spec and inside
``linear_qkv``/``linear_fc1`` (``layer_norm_weight``) in the TransformerEngine spec; the target
key names are read from the model, so both specs load.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping, Optional

import torch

from longrope2.model.config import ModelConfig

Span = Optional[tuple[int, int]]
Reader = Callable[..., torch.Tensor]
"""``read(hf_key, rows=None, cols=None)``: an HF tensor, or only rows ``[a, b)`` / columns ``[a, b)``."""


def is_fused(cfg: ModelConfig) -> bool:
    """Phi-3's layout: ``qkv_proj`` and ``gate_up_proj``."""
    return cfg.hf_architecture.startswith("Phi3")


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per_group: int,
                     head_dim: int) -> torch.Tensor:
    hidden = q.shape[-1]
    q = q.reshape(groups, per_group * head_dim, hidden)
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _qkv_from_megatron(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    hidden = qkv.shape[-1]
    grouped = qkv.view(groups, (per_group + 2) * cfg.head_dim, hidden)
    q, k, v = grouped.split([per_group * cfg.head_dim, cfg.head_dim, cfg.head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _uses_te_norms(keys) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in keys)


def _norm_keys(layer: str, te_norms: bool) -> tuple[str, str]:
    if te_norms:
        return f"{layer}.self_attention.linear_qkv.layer_norm_weight", f"{layer}.mlp.linear_fc1.layer_norm_weight"
    return f"{layer}.input_layernorm.weight", f"{layer}.pre_mlp_layernorm.weight"


# --- the key map: full model names and shapes on both sides ---------------------------------


def megatron_keys(cfg: ModelConfig, te_norms: bool = False) -> list[str]:
    """Every parameter of the full (TP=1, PP=1) megatron model, in HF's order."""
    keys = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        layer = f"decoder.layers.{i}"
        attn_norm, mlp_norm = _norm_keys(layer, te_norms)
        keys += [attn_norm, f"{layer}.self_attention.linear_qkv.weight", f"{layer}.self_attention.linear_proj.weight",
                 mlp_norm, f"{layer}.mlp.linear_fc1.weight", f"{layer}.mlp.linear_fc2.weight"]
    keys.append("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        keys.append("output_layer.weight")
    return keys


def megatron_shape(key: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The full (TP=1) shape of a megatron parameter."""
    h, attn = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    if key.endswith(("word_embeddings.weight", "output_layer.weight")):
        return (cfg.vocab_size, h)
    if key.endswith("linear_qkv.weight"):
        return ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim, h)
    if key.endswith("linear_proj.weight"):
        return (h, attn)
    if key.endswith("linear_fc1.weight"):
        return (2 * cfg.ffn_hidden_size, h)
    if key.endswith("linear_fc2.weight"):
        return (h, cfg.ffn_hidden_size)
    if key.endswith(("layernorm.weight", "layer_norm_weight")):
        return (h,)
    raise KeyError(f"{key} is not a parameter of a LLaMA-style megatron GPTModel")


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture has (``lm_head`` only when untied), with its shape."""
    h, ffn, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        if is_fused(cfg):
            out[f"{p}.self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            out.update({f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                        f"{p}.self_attn.v_proj.weight": (kv, h)})
        out[f"{p}.self_attn.o_proj.weight"] = (h, q)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        if is_fused(cfg):
            out[f"{p}.mlp.gate_up_proj.weight"] = (2 * ffn, h)
        else:
            out.update({f"{p}.mlp.gate_proj.weight": (ffn, h), f"{p}.mlp.up_proj.weight": (ffn, h)})
        out[f"{p}.mlp.down_proj.weight"] = (h, ffn)
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def check_hf_keys(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "HF checkpoint") -> None:
    """Raise, naming the key, unless ``shapes`` (HF key -> shape) is exactly the architecture's:
    every tensor present with its shape, nothing unknown (a bias, another architecture)."""
    want = hf_shapes(cfg)
    missing = [k for k in want if k not in shapes]
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} tensors the {cfg.hf_architecture} architecture needs, "
                       f"e.g. {missing[:3]} (fused Phi-3 vs separate LLaMA projections? wrong layer count?)")
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(shapes[key])}, the model config says {shape}")
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")  # old caches; a tied model's saved lm_head copy
    extra = [k for k in shapes if k not in want and not k.endswith(ignorable)]
    if extra:
        raise KeyError(f"{source} has {len(extra)} tensors the {cfg.hf_architecture} mapping does not know, "
                       f"e.g. {extra[:3]} (biases and other architectures are not supported)")


# --- one megatron parameter (one TP shard of it) from HF, and back ----------------------------


def _split(key: str) -> tuple[Optional[int], str]:
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    return (int(m[1]), m[2]) if m else (None, key)


def _chunk(total: int, rank: int, size: int) -> tuple[int, int]:
    n = total // size
    return rank * n, (rank + 1) * n


def megatron_from_hf(key: str, read: Reader, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of the full-model megatron parameter ``key``, read from HF
    tensors through ``read`` (only the rows/columns this shard needs)."""
    layer, name = _split(key)
    if layer is None:
        if name == "embedding.word_embeddings.weight":
            return read("model.embed_tokens.weight", rows=_chunk(cfg.vocab_size, tp_rank, tp_size))
        if name == "output_layer.weight":
            source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            return read(source, rows=_chunk(cfg.vocab_size, tp_rank, tp_size))
        if name == "decoder.final_layernorm.weight":
            return read("model.norm.weight")
        raise KeyError(f"no HF source for megatron parameter {key}")
    src, fused = f"model.layers.{layer}", is_fused(cfg)
    if name in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return read(f"{src}.input_layernorm.weight")
    if name in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return read(f"{src}.post_attention_layernorm.weight")
    d = cfg.head_dim
    if name == "self_attention.linear_qkv.weight":
        # whole query groups per rank: its q heads, k and v heads are each one contiguous block
        per_group = cfg.num_attention_heads // cfg.num_query_groups
        groups = cfg.num_query_groups // tp_size
        q0, qn = tp_rank * groups * per_group * d, groups * per_group * d
        k0, kn = tp_rank * groups * d, groups * d
        if fused:
            q_all, kv_all = cfg.num_attention_heads * d, cfg.num_query_groups * d
            name_qkv = f"{src}.self_attn.qkv_proj.weight"
            q = read(name_qkv, rows=(q0, q0 + qn))
            k = read(name_qkv, rows=(q_all + k0, q_all + k0 + kn))
            v = read(name_qkv, rows=(q_all + kv_all + k0, q_all + kv_all + k0 + kn))
        else:
            q = read(f"{src}.self_attn.q_proj.weight", rows=(q0, q0 + qn))
            k = read(f"{src}.self_attn.k_proj.weight", rows=(k0, k0 + kn))
            v = read(f"{src}.self_attn.v_proj.weight", rows=(k0, k0 + kn))
        return _qkv_to_megatron(q, k, v, groups, per_group, d)
    if name == "self_attention.linear_proj.weight":
        return read(f"{src}.self_attn.o_proj.weight", cols=_chunk(cfg.num_attention_heads * d, tp_rank, tp_size))
    if name == "mlp.linear_fc1.weight":
        a, b = _chunk(cfg.ffn_hidden_size, tp_rank, tp_size)
        if fused:
            ffn, name_gu = cfg.ffn_hidden_size, f"{src}.mlp.gate_up_proj.weight"
            gate, up = read(name_gu, rows=(a, b)), read(name_gu, rows=(ffn + a, ffn + b))
        else:
            gate, up = read(f"{src}.mlp.gate_proj.weight", rows=(a, b)), read(f"{src}.mlp.up_proj.weight", rows=(a, b))
        return torch.cat([gate, up], dim=0)
    if name == "mlp.linear_fc2.weight":
        return read(f"{src}.mlp.down_proj.weight", cols=_chunk(cfg.ffn_hidden_size, tp_rank, tp_size))
    raise KeyError(f"no HF source for megatron parameter {key}")


def hf_from_megatron(key: str, full: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF entries of one full (TP-gathered) megatron parameter."""
    layer, name = _split(key)
    if layer is None:
        names = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                 "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
        if name not in names:
            raise KeyError(f"no HF name for megatron parameter {key}")
        return [(names[name], full)]
    dst, fused = f"model.layers.{layer}", is_fused(cfg)
    if name in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return [(f"{dst}.input_layernorm.weight", full)]
    if name in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return [(f"{dst}.post_attention_layernorm.weight", full)]
    if name == "self_attention.linear_qkv.weight":
        q, k, v = _qkv_from_megatron(full, cfg)
        if fused:
            return [(f"{dst}.self_attn.qkv_proj.weight", torch.cat([q, k, v], dim=0))]
        return [(f"{dst}.self_attn.{n}_proj.weight", t) for n, t in zip("qkv", (q, k, v))]
    if name == "self_attention.linear_proj.weight":
        return [(f"{dst}.self_attn.o_proj.weight", full)]
    if name == "mlp.linear_fc1.weight":
        if fused:
            return [(f"{dst}.mlp.gate_up_proj.weight", full)]
        gate, up = full.chunk(2, dim=0)
        return [(f"{dst}.mlp.gate_proj.weight", gate), (f"{dst}.mlp.up_proj.weight", up)]
    if name == "mlp.linear_fc2.weight":
        return [(f"{dst}.mlp.down_proj.weight", full)]
    raise KeyError(f"no HF name for megatron parameter {key}")


def mapping_reader(hf: Mapping[str, torch.Tensor]) -> Reader:
    """A ``Reader`` over an in-memory HF state dict."""
    def read(key: str, rows: Span = None, cols: Span = None) -> torch.Tensor:
        t = hf[key]
        if rows is not None:
            t = t[rows[0]:rows[1]]
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        return t
    return read


# --- whole state dicts (in memory; the converter streams instead) ----------------------------


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, te_norms: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full (TP=1, PP=1) megatron ``GPTModel`` entries from an HF state dict; ``te_norms``
    names the norms as TransformerEngine's fused layers do."""
    read = mapping_reader(hf)
    for key in megatron_keys(cfg, te_norms):
        yield key, megatron_from_hf(key, read, cfg)


def megatron_to_hf(mcore: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF state-dict entries (LLaMA layout, or Phi-3's fused layout for Phi3 architectures)."""
    for key in megatron_keys(cfg, _uses_te_norms(mcore)):
        yield from hf_from_megatron(key, mcore[key], cfg)


def load_hf_into_megatron(model: torch.nn.Module, hf: Mapping[str, torch.Tensor] | Reader, cfg: ModelConfig,
                          progress: bool = False) -> None:
    """Copy HF weights into this rank's ``GPTModel`` (any TP/PP layout), one parameter at a time:
    each TP shard is cut from its HF tensors directly, so no full megatron state is ever built.
    An HF state dict is checked whole first (key set and every shape, nanoGPT's rule); a
    ``Reader`` (a streamed file) is checked by the caller (``check_hf_keys``)."""
    from megatron.core import parallel_state as ps

    if isinstance(hf, Mapping):
        check_hf_keys({k: tuple(v.shape) for k, v in hf.items()}, cfg, "HF state dict")
        read = mapping_reader(hf)
    else:
        read = hf
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = list(model.named_parameters())
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="import", unit="tensor", disable=torch.distributed.get_rank() != 0)
    with torch.no_grad():
        for key, param in params:
            shard = megatron_from_hf(reference_key(model, key), read, cfg, rank, size)
            if shard.shape != param.shape:
                raise ValueError(f"{key}: HF shard {tuple(shard.shape)} vs parameter {tuple(param.shape)}")
            param.copy_(shard)
            del shard


def tp_unshard(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) tensor from every TP rank's shard, in rank order (inverse of ``tp_shard``)."""
    if len(shards) == 1:
        return shards[0]
    if key.endswith("linear_fc1.weight"):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups], dim=0)
    if key.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return torch.cat(shards, dim=0)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    return shards[0]  # norms are replicated


# --- a full (TP=1, PP=1) megatron state into this rank's stage and TP shard ----------------


def tp_shard(key: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a full (TP=1) tensor, along megatron's partition dims."""
    if size == 1:
        return full
    if key.endswith("linear_fc1.weight"):
        # [gate; up]: each rank holds its slice of gate and its slice of up
        gate_up = full.view(2, full.shape[0] // 2, full.shape[1])
        return gate_up.chunk(size, dim=1)[rank].reshape(-1, full.shape[1])
    if key.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        # qkv rows are grouped per query group [q.., k, v], so whole groups go to each rank
        return full.chunk(size, dim=0)[rank]
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(size, dim=1)[rank]
    return full  # norms are replicated


def reference_key(model, key: str) -> str:
    """Map a stage-local parameter name to the full model's (PP numbers layers per stage)."""
    if key == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if not m:
        return key
    return f"decoder.layers.{model.decoder.layers[int(m[1])].layer_number - 1}.{m[2]}"


def shard_like(model, full: Mapping[str, torch.Tensor], fc1_rule=tp_shard) -> dict[str, torch.Tensor]:
    """This rank's parameters cut from a full state dict; every shape is checked."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for key, param in model.named_parameters():
        ref_key = reference_key(model, key)
        if ref_key not in full:
            raise KeyError(f"parameter {key} ({ref_key} of the full model) is missing from the source state")
        shard = fc1_rule(ref_key, full[ref_key], rank, size)
        if shard.shape != param.shape:
            raise ValueError(f"{key}: shard {tuple(shard.shape)} vs parameter {tuple(param.shape)}")
        out[key] = shard
    return out


def load_shard(model, full: Mapping[str, torch.Tensor], fc1_rule=tp_shard) -> None:
    """Copy this rank's stage and TP shard of a full megatron state dict into ``model``."""
    with torch.no_grad():
        for key, shard in shard_like(model, full, fc1_rule).items():
            model.get_parameter(key).copy_(shard)
