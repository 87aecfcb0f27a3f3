"""Checkpoint conversion at TP=2 and PP=2, run once under ``torchrun --nproc_per_node 2`` (gloo).

``--work`` holds what tests/test_convert.py prepared in one process: tiny HF models saved by
transformers (``<name>/hf``) and their TP=1 imports (``<name>/ck_tp1``). Per model:

* ``import_tp2``: ``longrope2 convert import-hf --tp 2`` (each rank reads its own rows/columns);
* ``logits_tp2``: the TP=1 import loaded at TP=2 with ``dist_checkpointing.load`` (what a train
  config's ``load:`` does), LongRoPE2 factors installed, logits below and above the original
  window vs transformers' ``longrope`` model on the same weights;
* ``logits_pp2``: the TP=2 import loaded at PP=2, the same comparison through megatron's 1F1B;
* ``export_tp2`` / ``export_pp2``: ``longrope2 convert export-hf --tp 2`` of the TP=2 import and
  ``--pp 2`` of the TP=1 import; the pytest side compares the files with the TP=1 export.

Results go to ``<work>/rank<r>.json`` after every check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checks import run_checks  # noqa: E402  (tests/distributed, the script's folder)
from factories import ramp_longrope2_scaling  # noqa: E402

from longrope2 import cli
from longrope2.model.config import ModelConfig
from longrope2.model.convert import export_hf_config
from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

MODELS = ("llama3", "phi3")
TARGET = 256
LENGTHS = (48, 128)  # below and above the original window of 64


def hf_reference(folder: Path, cfg: ModelConfig, scaling):
    """transformers' model on the source weights, with the longrope config the export writes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = export_hf_config(cfg, json.loads((folder / "config.json").read_text()), scaling, torch.float32)
    config = AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


def tokens_for(length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(length))


def load_at_layout(cfg: ModelConfig, scaling, checkpoint: Path):
    from megatron.core import dist_checkpointing

    from longrope2.model.gpt import build_gpt_model

    model = build_gpt_model(cfg, rope_scaling=scaling, initialize=False).eval()
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(state["model"])
    return model


def logits_through_schedule(model, tokens: torch.Tensor):
    """Full-vocab logits on the last stage (None elsewhere), through megatron's own schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)

    def keep(logits):
        return logits.sum() * 0, {"logits": logits.detach().clone()}

    def step(data_iterator, model):
        return model(next(data_iterator), positions, attention_mask=None), keep

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                                          num_microbatches=1, seq_length=tokens.shape[1],
                                          micro_batch_size=tokens.shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = out[0]["logits"]
    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def compare_logits(work: Path, name: str, checkpoint: Path, dims: ParallelDims) -> dict:
    hf_dir = work / name / "hf"
    cfg = ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    scaling = ramp_longrope2_scaling(cfg, cfg.original_max_position_embeddings, TARGET)
    initialize_parallel(dims)
    try:
        model = load_at_layout(cfg, scaling, checkpoint)
        hf = hf_reference(hf_dir, cfg, scaling)
        result = {}
        for length in LENGTHS:
            tokens = tokens_for(length, cfg.vocab_size)
            ours = logits_through_schedule(model, tokens)
            if ours is None:
                continue
            with torch.no_grad():
                theirs = hf(tokens).logits
            result[str(length)] = {"long_factors": model.rotary_pos_emb.uses_long_factors(length),
                                   "max_abs": (ours - theirs).abs().max().item(),
                                   "scale": theirs.abs().max().item()}
        return result
    finally:
        destroy_parallel()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    work = Path(parser.parse_args().work)
    checks = []
    for name in MODELS:
        m = work / name
        checks += [
            (f"{name}.import_tp2", partial(cli.main, ["convert", "import-hf", "--hf", str(m / "hf"),
                                                      "--output", str(m / "ck_tp2"), "--tp", "2"])),
            (f"{name}.logits_tp2", partial(compare_logits, work, name, m / "ck_tp1", ParallelDims(tp=2, pp=1, cp=1))),
            (f"{name}.logits_pp2", partial(compare_logits, work, name, m / "ck_tp2", ParallelDims(tp=1, pp=2, cp=1))),
            (f"{name}.export_tp2", partial(cli.main, ["convert", "export-hf", "--checkpoint", str(m / "ck_tp2"),
                                                      "--output", str(m / "out_tp2"), "--tp", "2",
                                                      "--max-shard-size", "40KB"])),
            (f"{name}.export_pp2", partial(cli.main, ["convert", "export-hf", "--checkpoint", str(m / "ck_tp1"),
                                                      "--output", str(m / "out_pp2"), "--pp", "2"])),
        ]
    return run_checks(checks, work, timeout_s=180)


if __name__ == "__main__":
    sys.exit(main())
