"""Needle-PPL of fixed candidates with one worker spanning TP=2, PP=2, CP=2 (2 ranks) or
PP=2 x CP=2 (4 ranks) equals the 1-rank value. Run by tests/test_scorer_parallel.py under
torchrun; rank 0 writes JSON."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import traceback
import json

import numpy as np
import torch.distributed as dist

from longrope2.data.needle import make_needle_document
from longrope2.data.tokenize import hashed_words
from longrope2.model.config import ModelConfig
from longrope2.model.gpt import build_gpt_model
from longrope2.model.hf_convert import load_shard
from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel
from longrope2.rope import RopeScaling
from longrope2.search.scorer import NeedleScorer

ORIGINAL, TARGET = 64, 256
LAYOUTS = {"tp2": dict(tp=2, pp=1, cp=1), "pp2": dict(tp=1, pp=2, cp=1), "cp2": dict(tp=1, pp=1, cp=2),
           "pp2cp2": dict(tp=1, pp=2, cp=2)}


def documents(cfg):
    encode = hashed_words(cfg.vocab_size).encode
    hay = encode("the quick brown fox jumps over the lazy dog and runs far away " * 100)
    rng = np.random.default_rng(0)
    return [make_needle_document(encode, hay, TARGET + 1, rng) for _ in range(3)]


def scores(cfg, state, layout):
    initialize_parallel(ParallelDims(**layout), seed=7)
    model = build_gpt_model(cfg)
    load_shard(model, state)
    scorer = NeedleScorer(model.eval(), documents(cfg))
    out = [scorer.score(None)] + [scorer.score(RopeScaling.from_method(m, cfg.rope_geometry, TARGET))
                                  for m in ("pi", "yarn")]
    destroy_parallel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="tp2,pp2,cp2", help="of " + ", ".join(LAYOUTS))
    args = parser.parse_args()
    # the process group outlives the layouts (initialize/destroy_parallel only rebuild megatron's)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), original_max_position_embeddings=ORIGINAL,
                              init_method_std=0.3)
    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1), seed=7)
    reference = build_gpt_model(cfg)
    state = {n: p.detach().clone() for n, p in reference.named_parameters()}
    for tensor in state.values():
        dist.broadcast(tensor, src=0)
    destroy_parallel()
    result = {"reference": scores(cfg, state, dict(tp=1, pp=1, cp=1))}
    for name in args.layouts.split(","):
        result[name] = scores(cfg, state, LAYOUTS[name])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        os._exit(1)  # the other rank may wait in a collective; torchrun stops it
