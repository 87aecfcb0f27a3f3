"""Build a LLaMA-style megatron-core ``GPTModel`` with the dual-cache LongRoPE rotary.

Layers come from megatron's specs: TransformerEngine's when it is importable and CUDA is up,
else the local spec with torch RMSNorm and our SDPA core attention (``model/attention.py``:
context parallel and packed documents, which megatron's local attention refuses). Parallel
sizes are read from megatron's ``parallel_state`` (``longrope2.parallel.initialize_parallel``).
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from longrope2.model.attention import SDPAttention
from longrope2.model.config import ModelConfig, megatron_transformer_config_kwargs
from longrope2.parallel.layout import ParallelDims
from longrope2.rope.rotary import install_dual_cache_rotary
from longrope2.rope.scaling import RopeScaling


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@functools.cache
def _say_once_which_attention_runs() -> None:
    """On a GPU without TransformerEngine the layers silently become the local spec; say so once."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print("[model] TransformerEngine is not importable: attention runs torch SDPA per document "
              "(longrope2.model.attention.SDPAttention), norms and linears are torch's", flush=True)


class TorchNorm:
    """megatron's ``WrappedTorchNorm`` that also works under sequence parallelism.

    Torch's RMSNorm is per token, so it is correct on a sequence shard, but megatron's wrapper
    asserts ``not sequence_parallel``. Build it with SP off and tag the weight
    ``sequence_parallel`` so that ``finalize_model_grads`` sums its partial grads over TP.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    # megatron's DotProductAttention materialises [b, h, s, s] and refuses CP and packed input
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    layers = [layer] * get_num_layers_to_build(config)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=TorchNorm))


def build_gpt_model(
    model_cfg: ModelConfig,
    *,
    rope_scaling: Optional[RopeScaling] = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    seq_length: Optional[int] = None,
    initialize: bool = True,
) -> GPTModel:
    """This pipeline stage's ``GPTModel`` (with its TP shard) for ``model_cfg``, using the
    original RoPE below the original window and ``rope_scaling``'s long factors above it.

    With ``sequence_parallel`` the norm weights' grads are partial per TP rank: train through
    megatron's ``DistributedDataParallel`` with ``config.finalize_model_grads_func =
    finalize_model_grads`` (the schedule then sums them over TP). ``initialize=False`` skips the
    random init (weights are loaded next: checkpoint conversion).
    """
    ParallelDims(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
    ).validate(model_cfg)  # clear errors before megatron's asserts
    on_gpu = torch.cuda.is_available()
    use_te = transformer_engine_available()
    if on_gpu and not use_te:
        _say_once_which_attention_runs()
    fused = use_te  # megatron's fused kernels need TE/apex CUDA extensions
    config = TransformerConfig(
        **megatron_transformer_config_kwargs(model_cfg),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        perform_initialization=initialize,
    )
    if seq_length is None:
        seq_length = rope_scaling.max_position_embeddings if rope_scaling else model_cfg.original_max_position_embeddings
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config, use_te),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=model_cfg.rope_theta,
        parallel_output=True,
    )
    # megatron's torch norms (local spec) are built on the CPU in fp32 whatever the config says
    # (megatron's own training moves the model and wraps it in Float16Module); the rotary,
    # installed next, keeps fp32 frequencies
    model.to(device=torch.cuda.current_device() if on_gpu else "cpu", dtype=params_dtype)
    install_dual_cache_rotary(model, rope_scaling, model_cfg.original_max_position_embeddings)
    return model
