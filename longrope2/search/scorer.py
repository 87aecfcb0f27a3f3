"""Needle-driven perplexity of one rope candidate on a loaded megatron-core model.

``exp(mean NLL over the answer tokens of every needle document)``. Swapping a candidate swaps
only the rotary's inverse frequencies (and the attention factor in the shared config); weights
stay loaded. The LM head runs only at the answer positions, never as full-vocabulary logits over
a 128k sequence: ``lm_head_only_at`` narrows the hidden states right before megatron's output
layer. Documents go through megatron's own schedule (``get_forward_backward_func``,
forward only), so a worker may span pipeline stages and tensor-parallel ranks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from longrope2.data.needle import NeedleDocument
from longrope2.rope.rotary import set_attention_factor
from longrope2.rope.scaling import RopeScaling


@contextmanager
def lm_head_only_at(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Make ``model.output_layer`` see only the hidden states at sequence ``positions``
    (``[s, b, h]`` -> ``[n, b, h]``), so logits are ``[b, n, vocab / tp]``."""
    layer = model.output_layer
    if getattr(layer, "sequence_parallel", False):
        raise ValueError("score with sequence_parallel off: the output layer would see a sequence shard")
    original = layer.forward

    def narrowed(hidden_states, *args, **kwargs):
        return original(hidden_states.index_select(0, positions), *args, **kwargs)

    layer.forward = narrowed
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


class NeedleScorer:
    """Scores rope candidates on fixed needle documents with a loaded model (one worker)."""

    def __init__(self, model: torch.nn.Module, documents: Sequence[NeedleDocument], device: torch.device | None = None):
        if not documents:
            raise ValueError("no needle documents to score on")
        lengths = {doc.length for doc in documents}
        if len(lengths) != 1:
            raise ValueError(f"needle documents must share one length, got {sorted(lengths)}")
        self.model = model
        self.core = _unwrap(model)
        self.documents = list(documents)
        self.seq_length = lengths.pop() - 1
        self.device = device or next(model.parameters()).device
        cp = parallel_state.get_context_parallel_world_size()
        if cp > 1 and self.seq_length % (2 * cp):
            raise ValueError(f"needle documents of {self.seq_length + 1} tokens: the {self.seq_length} inputs "
                             f"must divide by 2 x CP = {2 * cp}")

    def set_candidate(self, scaling: RopeScaling | None) -> None:
        """Swap the rope in place; the attention factor goes to the config every layer reads."""
        rotary = self.core.rotary_pos_emb
        rotary.set_scaling(scaling)
        set_attention_factor(self.core.config, scaling.resolved_attention_factor if scaling is not None else 1.0)

    def _batch(self, doc: NeedleDocument) -> dict[str, torch.Tensor]:
        inputs, labels, mask = doc.inputs_and_labels()
        batch = {
            "tokens": torch.tensor([inputs], device=self.device),
            "labels": torch.tensor([labels], device=self.device),
            "loss_mask": torch.tensor([mask], device=self.device, dtype=torch.float32),
            "position_ids": torch.arange(len(inputs), device=self.device)[None],
        }
        from megatron.core.utils import get_batch_on_this_cp_rank

        return get_batch_on_this_cp_rank(batch)

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        positions = torch.nonzero(batch["loss_mask"][0] > 0).flatten()
        core = _unwrap(model)
        if core.post_process:
            with lm_head_only_at(core, positions):
                output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        else:  # an earlier pipeline stage: hidden states go on to the next stage
            output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        labels = batch["labels"][:, positions]
        return output, partial(self._loss, labels)

    @staticmethod
    def _loss(labels: torch.Tensor, logits: torch.Tensor):
        # logits [b, n, vocab/tp] -> megatron's vocab-parallel cross entropy wants [n, b, v/tp]
        nll = tensor_parallel.vocab_parallel_cross_entropy(
            logits.transpose(0, 1).contiguous().float(), labels.transpose(0, 1).contiguous()
        )
        total = nll.sum()
        # clone: megatron divides the returned loss in place by the number of micro-batches
        return total, {"nll_sum": total.detach().clone(), "count": torch.tensor(float(labels.numel()), device=total.device)}

    @property
    def answer_counts(self) -> list[int]:
        """Answer tokens of each document (the same for every candidate)."""
        return [int(sum(doc.inputs_and_labels()[2])) for doc in self.documents]

    @torch.no_grad()
    def document_nll(self, start: int = 0, stop: int | None = None) -> list[float]:
        """Answer-token NLL sum of each document ``[start, stop)`` under the current candidate
        (the same on every rank of this worker); the documents are one schedule call, so a
        pipeline overlaps them as micro-batches."""
        documents = self.documents[start:stop]
        self.model.eval()
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter([self._batch(doc) for doc in documents]),
            model=[self.model],
            num_microbatches=len(documents),
            seq_length=self.seq_length,  # the full length: the schedule divides it by CP for its buffers
            micro_batch_size=1,
            forward_only=True,
        )
        totals = torch.zeros(len(documents), dtype=torch.float64, device=self.device)
        # Only the last stage has losses, and its TP ranks hold identical copies: count one.
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            for i, out in enumerate(outputs):
                totals[i] = out["nll_sum"].double()
        for group in (parallel_state.get_context_parallel_group(), parallel_state.get_model_parallel_group()):
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(totals, group=group)
        return totals.tolist()

    def answer_nll(self) -> tuple[float, int]:
        """Sum of answer-token NLL and their count over all documents."""
        return math.fsum(self.document_nll()), sum(self.answer_counts)

    def score(self, scaling: RopeScaling | None) -> float:
        """Needle-driven perplexity of ``scaling`` (``None``: the original RoPE) on every document."""
        self.set_candidate(scaling)
        nll, count = self.answer_nll()
        return math.exp(nll / count) if count else math.inf

    def score_documents(self, scaling: RopeScaling | None, start: int, stop: int) -> list[float]:
        """Per-document answer NLL of ``scaling`` on documents ``[start, stop)`` (successive halving)."""
        self.set_candidate(scaling)
        return self.document_nll(start, stop)
