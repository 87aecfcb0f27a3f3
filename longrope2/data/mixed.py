"""The mixed context window sampler (LongRoPE2 section 3.3): short packed vs long micro-batches.

Documents are split by length at the original window ``L_train``:

* **short** documents (``2 <= len <= L_train``) are packed into *short* micro-batches: THD
  layout, ``cu_seqlens`` at the document boundaries, attention only inside a document, positions
  restarting at 0 in each one; the longest piece is <= ``L_train``, so the dual-cache rotary
  picks the ORIGINAL RoPE;
* **long** documents (``len > L_train``) are concatenated into *long* micro-batches: one causal
  sequence with continuous positions 0..S-1 (S = the training length > ``L_train``), so the
  RESCALED RoPE is used. A document longer than S continues in the next long micro-batch; the
  label that would cross into a new document is masked.

Every micro-batch holds exactly ``seq_length`` input tokens, so the short/long token mix is the
fraction of short micro-batches: micro-batch ``i`` is short when ``floor((i+1) f) > floor(i f)``
(``f = short_fraction``), an exact, evenly spread mix. Each pool is an endless stream: epoch
``e`` is a permutation of the pool seeded by ``(seed, pool, e)``, and the k-th micro-batch of a
pool reads stream tokens ``[k S, k S + S]`` (S + 1 tokens: inputs and shifted labels). So
micro-batch ``i`` is a pure function of ``(seed, i)``: every rank builds its own micro-batches
with no communication, any data-parallel layout sees the same global batches, and the sampler's
whole state is the next index (an integer) — resuming is ``sampler[i]`` from that index on.

A short document cut at the end of one short micro-batch continues at the start of the next as
its own piece (positions restart); nothing is dropped.

**Context parallelism** (``pad_multiple = 2 cp``): each rank keeps chunks ``r`` and ``2cp-1-r`` of
*every* packed piece (TransformerEngine's THD layout), so each piece is padded to a multiple of
``2 cp``: its real tokens, then padding (token 0, loss mask 0, positions continuing), which only
later tokens of the same piece could see, so under causal attention no real token sees padding.
``cu_seqlens`` are then the padded (global) piece boundaries and ``cu_seqlens_unpadded`` the real
lengths' (megatron's ``cu_seqlens_q_padded`` / ``cu_seqlens_q``). The micro-batch still holds
exactly ``seq_length`` tokens and still reads stream tokens ``[k S, k S + S]``: what no longer fits
after the padding (at most ``pad_multiple - 1`` tokens per piece) is skipped, so micro-batch ``i``
stays a pure function of ``(seed, i, pad_multiple)`` and the state is still the index. The window
must be a multiple of ``pad_multiple`` so that a padded short piece never passes it (the rotary
picks the original RoPE by the longest padded piece). ``pad_multiple = 1`` is the unpadded layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = ["MicroBatch", "MixedWindowSampler", "DocumentStore"]

_FRACTION_DENOMINATOR = 1_000_000


@dataclass
class MicroBatch:
    """One micro-batch of ``seq_length`` tokens, batch dimension 1."""

    index: int
    """Global micro-batch index in the sampler's sequence."""
    kind: str
    """``"short"`` (packed THD, original RoPE) or ``"long"`` (one sequence, rescaled RoPE)."""
    tokens: torch.Tensor
    """[1, S] int64 input ids."""
    labels: torch.Tensor
    """[1, S] int64 next-token targets (0 where masked)."""
    loss_mask: torch.Tensor
    """[1, S] float32: 1 where the label is the next token of the same document."""
    position_ids: torch.Tensor
    """[1, S] int64: restart at 0 per packed piece (short); 0..S-1 (long)."""
    cu_seqlens: torch.Tensor
    """int32 piece boundaries ``[0, ..., S]``: the attention segments (``[0, S]`` for long)."""
    max_seqlen: int
    """Longest attention segment: what the rotary sees as the sequence length."""
    cu_seqlens_unpadded: Optional[torch.Tensor] = None
    """Padded short micro-batches (``pad_multiple > 1``): int32 cumulative REAL piece lengths
    (TE's ``cu_seqlens_q``; ``cu_seqlens`` are then the padded boundaries). ``None`` otherwise."""

    @property
    def is_short(self) -> bool:
        return self.kind == "short"

    def packed_seq_params(self):
        """megatron's ``PackedSeqParams`` (THD) for short micro-batches, ``None`` for long."""
        if not self.is_short:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        if self.cu_seqlens_unpadded is None:
            return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                                   max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)
        # megatron's rotary and our attention read the padded layout; TE both
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens_unpadded,
                               cu_seqlens_kv=self.cu_seqlens_unpadded, cu_seqlens_q_padded=self.cu_seqlens,
                               cu_seqlens_kv_padded=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        unpadded = None if self.cu_seqlens_unpadded is None else move(self.cu_seqlens_unpadded)
        return MicroBatch(self.index, self.kind, move(self.tokens), move(self.labels), move(self.loss_mask),
                          move(self.position_ids), move(self.cu_seqlens), self.max_seqlen, unpadded)


class DocumentStore:
    """Documents of one or more megatron indexed datasets, addressed by a global id."""

    def __init__(self, prefixes: Sequence[str | os.PathLike]):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from longrope2.data.indexed import check_indexed

        check_indexed(prefixes)
        self.datasets = [IndexedDataset(str(p)) for p in prefixes]
        lengths = [np.asarray(d.sequence_lengths, dtype=np.int64) for d in self.datasets]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._which = np.concatenate([np.full(len(x), i) for i, x in enumerate(lengths)]).astype(np.int64)
        self._local = np.concatenate([np.arange(len(x)) for x in lengths]).astype(np.int64)

    @classmethod
    def from_arrays(cls, documents: Sequence[Sequence[int]]) -> "DocumentStore":
        """In-memory documents (tests)."""
        store = cls.__new__(cls)
        docs = [np.asarray(d, dtype=np.int64) for d in documents]
        store.datasets = [docs]
        store.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        store._which = np.zeros(len(docs), np.int64)
        store._local = np.arange(len(docs), dtype=np.int64)
        return store

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        data = self.datasets[self._which[doc]]
        local = int(self._local[doc])
        if isinstance(data, list):
            return data[local][offset:offset + length]
        return np.asarray(data.get(local, offset=offset, length=length), dtype=np.int64)


class _Stream:
    """A pool of documents as an endless token stream, epoch by epoch in seeded permutations."""

    def __init__(self, store: DocumentStore, docs: np.ndarray, seed: int, pool: int):
        self.store, self.docs, self.seed, self.pool = store, docs, seed, pool
        self.epoch_tokens = int(store.lengths[docs].sum())

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = self.docs[np.random.default_rng([self.seed, self.pool, epoch]).permutation(len(self.docs))]
        ends = np.cumsum(self.store.lengths[order])
        return order, ends

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` tokens from stream offset ``start`` and, per token, an id of the document
        occurrence it belongs to (equal ids = same document in the same epoch)."""
        tokens, occurrence = [], []
        while count > 0:
            epoch, within = divmod(start, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            slot = int(np.searchsorted(ends, within, side="right"))
            doc_start = int(ends[slot - 1]) if slot else 0
            offset = within - doc_start
            n = min(count, int(ends[slot]) - within)
            tokens.append(self.store.read(int(order[slot]), offset, n))
            occurrence.append(np.full(n, epoch * len(self.docs) + slot, dtype=np.int64))
            start += n
            count -= n
        return np.concatenate(tokens), np.concatenate(occurrence)


class MixedWindowSampler:
    """Micro-batch ``i`` of the mixed short/long sequence; see the module docstring."""

    def __init__(self, store: DocumentStore, seq_length: int, original_window: int, short_fraction: float,
                 seed: int = 0, pad_multiple: int = 1):
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}")
        if seq_length % pad_multiple:
            raise ValueError(f"seq_length {seq_length} not divisible by pad_multiple {pad_multiple}")
        if short_fraction > 0 and original_window % pad_multiple:
            raise ValueError(f"original window {original_window} not divisible by pad_multiple {pad_multiple} "
                             "(2*cp): a padded short document could pass the window and get the rescaled RoPE")
        if not 0.0 <= short_fraction <= 1.0:
            raise ValueError(f"short_fraction must be in [0, 1], got {short_fraction}")
        if seq_length <= original_window and short_fraction < 1.0:
            raise ValueError(f"seq_length {seq_length} must exceed the original window {original_window} "
                             "(long micro-batches use the rescaled RoPE); only short_fraction 1 (pre-training) "
                             "may pack short documents into shorter micro-batches")
        self.store = store
        self.seq_length = seq_length
        self.original_window = original_window
        self.short_fraction = short_fraction
        self.seed = seed
        self.pad_multiple = pad_multiple
        self._num = round(short_fraction * _FRACTION_DENOMINATOR)
        lengths = store.lengths
        short = np.flatnonzero((lengths >= 2) & (lengths <= original_window))
        long = np.flatnonzero(lengths > original_window)
        if self._num > 0 and len(short) == 0:
            raise ValueError(f"short_fraction {short_fraction} > 0 but no document is <= the original window "
                             f"{original_window} tokens")
        if self._num < _FRACTION_DENOMINATOR and len(long) == 0:
            raise ValueError(f"short_fraction {short_fraction} < 1 but no document is longer than the original "
                             f"window {original_window} tokens")
        self.short_stream = _Stream(store, short, seed, 0) if len(short) else None
        self.long_stream = _Stream(store, long, seed, 1) if len(long) else None

    def _shorts_before(self, index: int) -> int:
        return index * self._num // _FRACTION_DENOMINATOR

    def kind(self, index: int) -> str:
        return "short" if self._shorts_before(index + 1) > self._shorts_before(index) else "long"

    def __getitem__(self, index: int) -> MicroBatch:
        if index < 0:
            raise IndexError(index)
        S = self.seq_length
        if self.kind(index) == "short":
            k = self._shorts_before(index)
            tokens, occ = self.short_stream.read(k * S, S + 1)
        else:
            k = index - self._shorts_before(index)
            tokens, occ = self.long_stream.read(k * S, S + 1)
        inputs, labels = tokens[:-1], tokens[1:]
        same_doc = occ[1:] == occ[:-1]
        if self.kind(index) == "short":
            starts = np.flatnonzero(np.r_[True, occ[1:-1] != occ[:-2]])  # piece starts within the S inputs
            cu = np.r_[starts, S].astype(np.int32)
            positions = np.arange(S) - np.repeat(starts, np.diff(cu))
            max_seqlen = int(np.diff(cu).max())
            kind = "short"
        else:
            cu = np.array([0, S], dtype=np.int32)
            positions = np.arange(S)
            max_seqlen = S
            kind = "long"
        labels = np.where(same_doc, labels, 0)
        unpadded = None
        if kind == "short" and self.pad_multiple > 1:
            inputs, labels, same_doc, positions, cu, unpadded = _pad_pieces(inputs, labels, same_doc, cu,
                                                                           self.pad_multiple)
            max_seqlen = int(np.diff(cu).max())
        as_row = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(dtype).unsqueeze(0)  # noqa: E731
        return MicroBatch(
            index=index,
            kind=kind,
            tokens=as_row(inputs, torch.int64),
            labels=as_row(labels, torch.int64),
            loss_mask=as_row(same_doc, torch.float32),
            position_ids=as_row(positions, torch.int64),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=max_seqlen,
            cu_seqlens_unpadded=None if unpadded is None else torch.from_numpy(unpadded),
        )

    def iterate(self, start: int = 0, stop: Optional[int] = None) -> Iterator[MicroBatch]:
        """Micro-batches ``start, start + 1, ...`` (resume: ``start`` = the saved index)."""
        index = start
        while stop is None or index < stop:
            yield self[index]
            index += 1


def _pad_pieces(inputs, labels, same_doc, cu, multiple: int):
    """Re-lay the packed pieces of one short micro-batch, each padded to a multiple of
    ``multiple``, into the same ``S`` slots; the tail that no longer fits is left out (the last
    piece is cut to the room left, a multiple of ``multiple`` since ``S`` is). Returns inputs,
    labels, loss mask, positions (continuing into the padding), padded and real cu_seqlens."""
    S = len(inputs)
    tokens, targets = np.zeros(S, np.int64), np.zeros(S, np.int64)
    mask, positions = np.zeros(S, bool), np.zeros(S, np.int64)
    padded, real = [0], [0]
    for start, n in zip(cu[:-1].tolist(), np.diff(cu).tolist()):
        at = padded[-1]
        room = S - at
        if room == 0:
            break
        n = min(n, room)
        width = -(-n // multiple) * multiple  # <= room: room is a multiple too
        tokens[at:at + n] = inputs[start:start + n]
        targets[at:at + n] = labels[start:start + n]
        mask[at:at + n] = same_doc[start:start + n]
        positions[at:at + width] = np.arange(width)
        padded.append(at + width)
        real.append(real[-1] + n)
    assert padded[-1] == S, (padded[-1], S)  # the real tokens alone fill S, the padded ones more
    return tokens, targets, mask, positions, np.asarray(padded, np.int32), np.asarray(real, np.int32)
