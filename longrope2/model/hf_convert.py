"""HF <-> megatron-core weight mapping for LLaMA-style models (LLaMA, SmolLM2, Phi-3 fused qkv).

A key map plus layout conversion, one tensor at a time so that callers can stream. Megatron's
layouts differ from HF's in two places:

* ``linear_qkv`` rows are grouped per query group ``[q_0..q_{h/g-1}, k, v]`` for each of the
  ``g`` groups (HF: all q rows, then all k, then all v);
* ``linear_fc1`` is ``[gate; up]`` (HF LLaMA: two matrices; Phi-3: ``gate_up_proj`` already so).

Norm weights sit in ``input_layernorm``/``pre_mlp_layernorm`` in megatron's local spec and inside
``linear_qkv``/``linear_fc1`` (``layer_norm_weight``) in the TransformerEngine spec; the target
key names are read from the model, so both specs load.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch

from longrope2.model.config import ModelConfig


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    groups, per_group = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    hidden = q.shape[-1]
    q = q.view(groups, per_group * cfg.head_dim, hidden)
    k = k.view(groups, cfg.head_dim, hidden)
    v = v.view(groups, cfg.head_dim, hidden)
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


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, te_norms: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full (TP=1, PP=1) megatron ``GPTModel`` entries from an HF state dict; ``te_norms``
    names the norms as TransformerEngine's fused layers do."""
    fused = "model.layers.0.self_attn.qkv_proj.weight" in hf  # Phi-3 layout
    yield "embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_query_groups * cfg.head_dim
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"decoder.layers.{i}"
        if fused:
            q, k, v = hf[f"{src}.self_attn.qkv_proj.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
            fc1 = hf[f"{src}.mlp.gate_up_proj.weight"]
        else:
            q, k, v = (hf[f"{src}.self_attn.{n}_proj.weight"] for n in "qkv")
            fc1 = torch.cat([hf[f"{src}.mlp.gate_proj.weight"], hf[f"{src}.mlp.up_proj.weight"]], dim=0)
        attn_norm, mlp_norm = _norm_keys(dst, te_norms)
        yield attn_norm, hf[f"{src}.input_layernorm.weight"]
        yield f"{dst}.self_attention.linear_qkv.weight", _qkv_to_megatron(q, k, v, cfg)
        yield f"{dst}.self_attention.linear_proj.weight", hf[f"{src}.self_attn.o_proj.weight"]
        yield mlp_norm, hf[f"{src}.post_attention_layernorm.weight"]
        yield f"{dst}.mlp.linear_fc1.weight", fc1
        yield f"{dst}.mlp.linear_fc2.weight", hf[f"{src}.mlp.down_proj.weight"]
    yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output_layer.weight", hf["lm_head.weight"]


def megatron_to_hf(mcore: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF state-dict entries (LLaMA layout, or Phi-3's fused layout for Phi3 architectures)."""
    fused = cfg.hf_architecture.startswith("Phi3")
    yield "model.embed_tokens.weight", mcore["embedding.word_embeddings.weight"]
    te_norms = _uses_te_norms(mcore)
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        attn_norm, mlp_norm = _norm_keys(src, te_norms)
        q, k, v = _qkv_from_megatron(mcore[f"{src}.self_attention.linear_qkv.weight"], cfg)
        fc1 = mcore[f"{src}.mlp.linear_fc1.weight"]
        yield f"{dst}.input_layernorm.weight", mcore[attn_norm]
        if fused:
            yield f"{dst}.self_attn.qkv_proj.weight", torch.cat([q, k, v], dim=0)
            yield f"{dst}.mlp.gate_up_proj.weight", fc1
        else:
            yield from ((f"{dst}.self_attn.{n}_proj.weight", t) for n, t in zip("qkv", (q, k, v)))
            gate, up = fc1.chunk(2, dim=0)
            yield f"{dst}.mlp.gate_proj.weight", gate
            yield f"{dst}.mlp.up_proj.weight", up
        yield f"{dst}.self_attn.o_proj.weight", mcore[f"{src}.self_attention.linear_proj.weight"]
        yield f"{dst}.post_attention_layernorm.weight", mcore[mlp_norm]
        yield f"{dst}.mlp.down_proj.weight", mcore[f"{src}.mlp.linear_fc2.weight"]
    yield "model.norm.weight", mcore["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", mcore["output_layer.weight"]


def load_hf_into_megatron(model: torch.nn.Module, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy HF weights into this rank's ``GPTModel`` (any TP/PP layout). Every parameter must be
    found and every shape match before anything is copied (nanoGPT's rule); the full state is
    built once per rank, which is fine up to a few billion parameters."""
    full = dict(hf_to_megatron(hf, cfg, _uses_te_norms(model.state_dict())))
    load_shard(model, full)

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
