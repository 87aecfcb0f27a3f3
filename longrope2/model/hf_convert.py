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


def _norm_keys(layer: str, target_keys: set[str]) -> tuple[str, str]:
    local = (f"{layer}.input_layernorm.weight", f"{layer}.pre_mlp_layernorm.weight")
    if local[0] in target_keys:
        return local
    return f"{layer}.self_attention.linear_qkv.layer_norm_weight", f"{layer}.mlp.linear_fc1.layer_norm_weight"


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, target_keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield megatron (TP=1, PP=1) ``GPTModel`` state-dict entries from an HF state dict."""
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
        attn_norm, mlp_norm = _norm_keys(dst, target_keys)
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
    keys = set(mcore)
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        attn_norm, mlp_norm = _norm_keys(src, keys)
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
    """Copy HF weights into a TP=1/PP=1 megatron ``GPTModel``; every key and shape must match
    (nanoGPT's rule: assert before copying), megatron's ``_extra_state`` entries aside."""
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    converted = dict(hf_to_megatron(hf, cfg, set(target)))
    missing, unexpected = sorted(set(target) - set(converted)), sorted(set(converted) - set(target))
    if missing or unexpected:
        raise KeyError(f"HF -> megatron key mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in converted.items():
        if tensor.shape != target[key].shape:
            raise ValueError(f"{key}: HF gives {tuple(tensor.shape)}, the model has {tuple(target[key].shape)}")
    with torch.no_grad():
        for key, tensor in converted.items():
            target[key].copy_(tensor)
