"""The model under evaluation and the rope configs swapped onto it.

One HF causal LM is loaded per eval (sdpa attention: eval is inference, and HF's rope types are
what users deploy). Every rope config is a set of HF config fields, written into the model's
config and made live by rebuilding the rotary-embedding modules from it; weights stay loaded.
The result equals loading a fresh model with that config.json (tests/test_eval_ppl.py).

Rope specs (``ropes`` in the eval config), each evaluated as what it is at every length:

* ``checkpoint``: the rope the checkpoint was loaded with (e.g. an exported LongRoPE2 model);
* ``original``: the pre-trained RoPE (transformers ``default``), the baseline;
* ``pi``: position interpolation, transformers ``linear`` with ``factor = s`` (s = target /
  original window), at every length;
* ``ntk``: the NTK-aware base change, transformers ``default`` with
  ``rope_theta = base * s ** (d / (d - 2))`` (d = rotary dim; ``rope/factors.ntk_factors``'s
  lambda_i = s ** (2i / (d - 2))) at every length. transformers' ``dynamic`` is not this: it
  changes the base with the sequence length and keeps the original RoPE inside the window;
* ``yarn``: transformers ``yarn`` (``factor = s``, beta_fast 32, beta_slow 1, attention factor
  0.1 ln s + 1) at every length;
* ``PATH`` or ``LABEL=PATH``: a JSON file -- a search ``best.json`` (``long_factor``,
  ``attention_factor``, ``target_length``), a ``rope_config.json`` / HF ``config.json``
  (``rope_parameters`` or ``rope_scaling``), or a plain list of long factors, as HF
  ``longrope`` (short factors inside the original window, long factors beyond it). Label
  default: ``longrope2`` for a search result, else the file stem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longrope2.rope.scaling import RopeGeometry, RopeScaling

FAMILIES = ("pi", "ntk", "yarn")
_ROPE_FIELDS = ("rope_parameters", "max_position_embeddings", "original_max_position_embeddings")
_MISSING = object()


@dataclass(frozen=True)
class Rope:
    label: str
    fields: dict[str, Any] | None
    """HF config fields (``to_hf_config``); None = the checkpoint's own rope."""
    spec: str

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(self.fields, sort_keys=True) if self.fields is not None else "checkpoint"
        return hashlib.sha1(payload.encode()).hexdigest()[:12]

    @property
    def rope_type(self) -> str:
        """The transformers rope type, with its defining parameters (for the report)."""
        if self.fields is None:
            return "as loaded"
        rope = self.fields["rope_parameters"]
        kind = rope["rope_type"]
        if kind == "linear":
            return f"linear (factor {rope['factor']:g})"
        if kind == "yarn":
            return f"yarn (factor {rope['factor']:g})"
        if kind == "default":
            return f"default (rope_theta {rope['rope_theta']:.6g})"
        return f"{kind} (original window {rope['original_max_position_embeddings']})"


def baseline_fields(method: str, geometry: RopeGeometry, target_length: int | None) -> dict[str, Any]:
    """HF config fields of ``original``, ``pi``, ``ntk`` or ``yarn`` (module docstring)."""
    base, orig = geometry.rope_theta, geometry.original_max_position_embeddings
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    if geometry.rotary_percent != 1.0:
        rope["partial_rotary_factor"] = geometry.rotary_percent
    if method == "original":
        return {"rope_parameters": rope}
    if target_length is None:
        raise ValueError(f"rope {method!r} needs target_length (the extended window)")
    if target_length <= orig:
        raise ValueError(f"rope {method!r}: target_length {target_length} must exceed the original window {orig}")
    s = target_length / orig
    if method == "pi":
        rope.update(rope_type="linear", factor=s)
    elif method == "ntk":
        d = geometry.rotary_dim
        rope["rope_theta"] = base * s ** (d / (d - 2))
    elif method == "yarn":
        rope.update(rope_type="yarn", factor=s, original_max_position_embeddings=orig)
    else:
        raise ValueError(f"unknown baseline {method!r}")
    return {"rope_parameters": rope, "max_position_embeddings": target_length}


def check_rope_spec(spec: str) -> tuple[str, str]:
    """``(label, what)`` of a rope spec, or a ``ValueError``: before any model is loaded."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if path not in ("checkpoint", "original", *FAMILIES) and not Path(path).is_file():
        raise ValueError(f"rope {spec!r}: not checkpoint, original, {', '.join(FAMILIES)} or an existing JSON file")
    return label, path


def resolve_rope(spec: str, geometry: RopeGeometry, target_length: int | None) -> Rope:
    """A rope spec (see the module docstring) as HF config fields."""
    label, path = check_rope_spec(spec)
    if path == "checkpoint":
        return Rope(label or "checkpoint", None, spec)
    if path in ("original", *FAMILIES):
        return Rope(label or path, baseline_fields(path, geometry, target_length), spec)
    file = Path(path)
    scaling = RopeScaling.from_file(file, geometry, fallback_target_length=target_length)
    data = json.loads(file.read_text())
    searched = isinstance(data, dict) and "critical_dim" in data
    return Rope(label or ("longrope2" if searched else file.stem), scaling.to_hf_config(), spec)


class RopeSwitch:
    """Puts rope configs on a loaded HF model: config fields + rebuilt rotary modules."""

    def __init__(self, model):
        self.model = model
        # deepcopy would copy the sentinel too (a new object): copy only the values present
        self.saved = {k: copy.deepcopy(v) if (v := getattr(model.config, k, _MISSING)) is not _MISSING else v
                      for k in _ROPE_FIELDS}
        self.geometry = RopeGeometry.from_hf_config(model.config)
        self.current: Rope | None = None

    def apply(self, rope: Rope) -> None:
        config = self.model.config
        # back to the checkpoint's fields first, so that no field of the previous rope lingers
        for key, value in self.saved.items():
            if value is _MISSING:
                if hasattr(config, key):
                    delattr(config, key)
            else:
                setattr(config, key, copy.deepcopy(value))
        for key, value in (rope.fields or {}).items():
            setattr(config, key, copy.deepcopy(value))
        rebuild_rotary(self.model)
        self.current = rope


def rebuild_rotary(model) -> int:
    """Re-create every ``rotary_emb`` module from the (shared) config; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            device = next((b.device for b in module.buffers()), None)
            fresh = type(module)(config=module.config)
            setattr(parent, name.rsplit(".", 1)[-1], fresh.to(device) if device is not None else fresh)
            replaced += 1
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no rotary_emb module to rebuild")
    return replaced


# --- loading ------------------------------------------------------------------------------------
def is_megatron_checkpoint(path: Path) -> bool:
    """A megatron-core distributed checkpoint (or a training output_dir) rather than an HF folder."""
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    return any((path / m).is_file() for m in ("metadata.json", "latest", "checkpoints/latest"))


def export_megatron(path: Path, into: Path, model_spec: str | None = None) -> Path:
    """``longrope2 convert export-hf`` (the converter's own process, which sets up
    torch.distributed) into the folder ``into``; the exported config keeps the checkpoint's rope."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "longrope2.cli", "convert", "export-hf", "--checkpoint", str(path),
               "--output", str(into)]
    if model_spec:
        command += ["--model", model_spec]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"exporting the megatron checkpoint {path} to HF failed:\n{done.stderr.strip()[-1500:]}")
    return into


def load_model(source: str, dtype: str = "float32", attn_implementation: str = "sdpa",
               megatron_model: str | None = None):
    """``(model, hf_tokenizer)`` from an HF folder, a ``.gguf``, ``smollm2`` or a megatron
    checkpoint (exported to a temporary HF folder first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longrope2.model.pretrained import smollm2_gguf_path

    path = smollm2_gguf_path() if source == "smollm2" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    kwargs = {"attn_implementation": attn_implementation, "dtype": getattr(torch, dtype)}
    if is_megatron_checkpoint(path):
        with tempfile.TemporaryDirectory(prefix="longrope2-eval-") as tmp:
            folder = export_megatron(path, Path(tmp) / "hf", megatron_model)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").exists() or \
                (folder / "tokenizer_config.json").exists() else None
        return model, tokenizer
    if path.suffix == ".gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
    else:
        folder, extra = path, {}
    model = AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
