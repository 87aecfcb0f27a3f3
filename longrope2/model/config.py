"""LLaMA-style model description: YAML presets, HF config import, megatron TransformerConfig.

One ``ModelConfig`` describes the architecture (what an HF ``config.json`` says); parallel
layout, precision and rope rescaling are passed alongside, never folded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from longrope2 import configs
from longrope2.rope.frequencies import rotary_dim
from longrope2.rope.scaling import RopeGeometry

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only LLaMA-style transformer (RMSNorm, SwiGLU, GQA, RoPE)."""

    name: str = "custom"
    """Preset name, for logs."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """SwiGLU inner size (HF ``intermediate_size``)."""
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (HF ``num_key_value_heads``); equal to the heads for plain MHA."""
    head_dim: int
    vocab_size: int
    rope_theta: float
    original_max_position_embeddings: int
    """The pre-training window L_train: RoPE below it is kept, above it rescaled."""
    rotary_percent: float = 1.0
    """Fraction of each head that is rotated (Phi-4-mini: 0.75)."""
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    hf_architecture: str = "LlamaForCausalLM"
    """HF class this architecture loads as, for conversion and reference tests."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.rope_theta <= 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        rotary_dim(self.head_dim, self.rotary_percent)  # raises on an odd or empty rotary dim

    @property
    def rope_geometry(self) -> RopeGeometry:
        return RopeGeometry(self.head_dim, self.rope_theta, self.original_max_position_embeddings, self.rotary_percent)

    @property
    def rotary_dim(self) -> int:
        return rotary_dim(self.head_dim, self.rotary_percent)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """Strict: unknown keys are errors, so a typo never silently falls back to a default."""
        return configs.from_dict(cls, values, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """A model preset, or the ``model:`` section of a run config."""
        return configs.load_yaml(cls, path, section="model")

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A preset from ``configs/models`` by file stem, e.g. ``smollm2_135m``."""
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ValueError(f"no model preset {name!r}; known: {known}")
        return cls.from_yaml(path)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any, name: str = "hf") -> "ModelConfig":
        """From an HF ``config.json`` dict or ``PretrainedConfig`` (LLaMA, Phi-3, SmolLM2, ...)."""
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        geometry = RopeGeometry.from_hf_config(cfg)
        heads = cfg["num_attention_heads"]
        architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
        return cls(
            name=name,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            head_dim=geometry.head_dim,
            vocab_size=cfg["vocab_size"],
            rope_theta=geometry.rope_theta,
            original_max_position_embeddings=geometry.original_max_position_embeddings,
            rotary_percent=geometry.rotary_percent,
            norm_epsilon=cfg.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_method_std=cfg.get("initializer_range", 0.02),
            hf_architecture=architectures[0],
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The matching HF config.json fields (without rope rescaling; see ``RopeScaling``)."""
        cfg = {
            "architectures": [self.hf_architecture],
            "model_type": "phi3" if self.hf_architecture.startswith("Phi3") else "llama",
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.original_max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.init_method_std,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rotary_percent != 1.0:
            cfg["partial_rotary_factor"] = self.rotary_percent
        return cfg

    def num_parameters(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + self.hidden_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (matmul parameters, LM head included) plus causal
        attention at half the square, the convention of Megatron's and nnScaler's MFU reports."""
        embedding_params = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        lm_head = self.vocab_size * self.hidden_size
        matmul_params = self.num_parameters() - embedding_params + lm_head
        attention = self.num_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * (matmul_params + attention)

    def forward_flops(self, seq_len: int, lm_head_tokens: int | None = None) -> float:
        """Forward FLOPs of one sequence of ``seq_len`` tokens (a third of training's, same
        convention), with the LM head at ``lm_head_tokens`` positions only (None: every token)."""
        lm_head = 2.0 * self.vocab_size * self.hidden_size
        full = self.flops_per_token(seq_len) / 3 * seq_len
        return full - lm_head * (seq_len - (seq_len if lm_head_tokens is None else lm_head_tokens))

    def flops(self, document_lengths) -> float:
        """Training FLOPs of one micro-batch whose documents (attention segments) have these
        lengths: ``sum(n * flops_per_token(n))``, so a packed micro-batch counts each document's
        own causal attention, not the square of the whole sequence."""
        return float(sum(int(n) * self.flops_per_token(int(n)) for n in document_lengths))


def megatron_transformer_config_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The architecture part of megatron's ``TransformerConfig`` for a LLaMA-style model.

    Parallel sizes, dtype and fusions are the caller's (they depend on the device and layout).
    """
    import torch.nn.functional as F

    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # half-split rotation (rotate_half), as HF LLaMA/Phi-3 checkpoints are laid out
        rotary_interleaved=False,
    )

