"""The needle scorer against a brute-force full-logit reference on the same megatron model."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longrope2.data.needle import make_needle_document
from longrope2.data.tokenize import hashed_words
from longrope2.model.config import ModelConfig
from longrope2.rope import RopeScaling
from longrope2.search.scorer import NeedleScorer, lm_head_only_at

ORIGINAL, TARGET = 64, 256


@pytest.fixture(scope="module")
def model():
    from longrope2.model.gpt import build_gpt_model
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1), seed=5)
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), original_max_position_embeddings=ORIGINAL)
    torch.manual_seed(5)
    yield cfg, build_gpt_model(cfg).eval()
    destroy_parallel()


def _documents(cfg, count=3, length=TARGET + 1):
    encode = hashed_words(cfg.vocab_size).encode
    hay = encode("the quick brown fox jumps over the lazy dog " * 200)
    rng = np.random.default_rng(0)
    return [make_needle_document(encode, hay, length, rng) for _ in range(count)]


def _full_logit_reference(model, documents):
    total, count = 0.0, 0
    for doc in documents:
        inputs, labels, mask = doc.inputs_and_labels()
        with torch.no_grad():
            logits = model(torch.tensor([inputs]), torch.arange(len(inputs))[None], attention_mask=None)[0]
        nll = F.cross_entropy(logits, torch.tensor(labels), reduction="none")
        total += (nll * torch.tensor(mask)).sum().item()
        count += sum(mask)
    return math.exp(total / count)


def test_scorer_equals_full_logit_perplexity(model):
    cfg, gpt = model
    documents = _documents(cfg)
    scorer = NeedleScorer(gpt, documents)
    scores = []
    for scaling in (None, RopeScaling.from_method("yarn", cfg.rope_geometry, TARGET),
                    RopeScaling.from_method("pi", cfg.rope_geometry, TARGET)):
        scores.append(scorer.score(scaling))
        assert scores[-1] == pytest.approx(_full_logit_reference(gpt, documents), rel=1e-5)
    assert len(set(scores)) == 3  # each candidate really changes the model


def test_lm_head_sees_only_the_answer_positions(model):
    cfg, gpt = model
    seen = []
    hook = gpt.output_layer.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    try:
        with lm_head_only_at(gpt, torch.tensor([5, 9])):
            logits = gpt(torch.zeros(1, 32, dtype=torch.long), torch.arange(32)[None], attention_mask=None)
    finally:
        hook.remove()
    assert logits.shape == (1, 2, cfg.vocab_size) and seen == [torch.Size([2, 1, cfg.vocab_size])]
    assert "forward" not in vars(gpt.output_layer)  # restored


def test_scorer_rejects_mixed_lengths(model):
    cfg, gpt = model
    with pytest.raises(ValueError, match="share one length"):
        NeedleScorer(gpt, _documents(cfg, 1, 200) + _documents(cfg, 1, 201))
