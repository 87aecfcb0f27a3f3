"""Mixed context window mid-training on megatron-core.

Set-up, in order (``Trainer.__init__``): every config check that needs no process group
(``TrainConfig.check``) -> megatron's process groups (TP, PP, CP, DP) -> data (the embedded books
are tokenized once, by rank 0) -> the model (``build_gpt_model``: dual-cache rotary, TE on GPU,
our SDPA attention on CPU) -> megatron ``DistributedDataParallel`` + ``DistributedOptimizer``
(Adam, grad clipping) and ``OptimizerParamScheduler`` (linear warm-up, cosine) -> resume from the
newest checkpoint in ``output_dir`` (or weights from ``load``).

A step (``train_step``): the step's ``global_batch_size`` micro-batches are sampler indices
``[step * G, (step + 1) * G)``; DP rank r takes its contiguous ``G / dp`` of them and runs
megatron's forward-backward function (1F1B with PP). Short micro-batches go in as packed THD
(``PackedSeqParams``), long ones as one sequence. Under CP a long micro-batch is sliced into
``2 cp`` chunks (rank r keeps r and 2cp-1-r); a short one has each document padded to a multiple of
``2 cp`` by the sampler and rank r keeps chunks r and 2cp-1-r of every document (TE's THD layout,
``thd_cp_indices``), with the global cu_seqlens. The
loss of a micro-batch is its mean next-token loss; the step's loss is the mean over the global
batch, so every layout optimizes (and logs) the same number.

Checkpoints are megatron distributed checkpoints (``dist_checkpointing.save``) of the model's and
the optimizer's sharded state dicts plus the scheduler, step, sampler index and each rank's RNG
state, in ``<output_dir>/checkpoints/iter_NNNNNNN``; ``checkpoints/latest`` names the newest
complete one. They are written every ``save_interval`` steps, at the end, and on SIGTERM (Slurm
preemption): the signal is noted, all ranks agree after the current step, save, and stop.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from longrope2.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def layout_independent_init(model, model_cfg, seed: int) -> None:
    """Random weights that do not depend on the parallel layout: each parameter of the full
    (TP=1, PP=1) model is drawn from its own generator, seeded by ``(seed, name)``, and this rank
    keeps its stage's and TP shard. (megatron's own init draws stage by stage from one stream, so
    a PP=2 model would start from other weights than a PP=1 one.) Megatron's distributions:
    N(0, std) for weights, N(0, std / sqrt(2 layers)) for the two output projections of each
    layer, ones for norms."""
    import math
    import zlib

    from longrope2.model.hf_convert import reference_key, tp_shard

    rank, size = parallel_rank_size()
    std = model_cfg.init_method_std
    with torch.no_grad():
        for key, param in model.named_parameters():
            ref = reference_key(model, key)
            if "norm" in ref:
                param.fill_(1.0)
                continue
            shape = list(param.shape)
            if ref.endswith(("linear_fc1.weight", "linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
                shape[0] *= size
            elif ref.endswith(("linear_proj.weight", "linear_fc2.weight")):
                shape[1] *= size
            scale = std / math.sqrt(2 * model_cfg.num_layers) if ref.endswith(
                ("linear_proj.weight", "linear_fc2.weight")) else std
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(ref.encode()))
            full = torch.randn(shape, generator=generator) * scale
            param.copy_(tp_shard(ref, full, rank, size))


def parallel_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)



def _preemption_safe_checkpoint_writer() -> None:
    """Give megatron's checkpoint writer a results queue whose server process ignores SIGTERM.

    megatron-core's ``FileSystemWriterAsync`` collects its write results through a
    ``multiprocessing`` Manager queue that it starts on the first save and keeps for the life of
    the process. Slurm's preemption (and ``scancel --signal=TERM``) sends SIGTERM to every
    process of the job step, that server included, which then dies, so the checkpoint the
    trainer writes on SIGTERM failed ("ForkAwareLocal ... no attribute 'connection'", seen on the
    2-node local Slurm). The same queue, started ignoring SIGTERM, survives; SIGKILL still ends it,
    and so does its rank's death (an orphan ignoring SIGTERM outlived killed runs in CI).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from longrope2.train.child_process import ignore_sigterm_and_die_with_parent

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    global _WRITER_MANAGER
    _WRITER_MANAGER = SyncManager(ctx=mp.get_context("spawn"))  # the context megatron's own queue uses
    _WRITER_MANAGER.start(ignore_sigterm_and_die_with_parent)
    filesystem_async._results_queue = _WRITER_MANAGER.Queue()


_WRITER_MANAGER = None
"""The Manager behind that queue, kept alive for the process (collecting it would stop it)."""


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # 1. every check that needs no process group: fail before any work
        self.dims, self.model_cfg, self.scaling = config.check(world)
        self.output_dir = Path(config.output_dir)
        self.on_gpu = torch.cuda.is_available()
        self.dtype = config.torch_dtype(self.on_gpu)

        # 2. process groups
        from longrope2.parallel import initialize_parallel

        initialize_parallel(self.dims, seed=config.seed, timeout_minutes=config.collective_timeout_s / 60)
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp = ps.get_context_parallel_world_size()
        self.micro_batches = config.global_batch_size // self.dp
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

        # 3. data
        self.sampler = self._build_sampler()

        # 4. model, 5. DDP + distributed optimizer + schedule
        self.model, self.ddp, self.optimizer, self.scheduler = self._build_model_and_optimizer()

        # 6. state: resume, or weights from `load`
        self.step = 0
        self._stop_requested = False
        self._writer = None
        self._metrics = None
        resumed = self.load_checkpoint()
        if not resumed and config.load is not None:
            self._load_weights(Path(config.load))
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # --- set-up ---------------------------------------------------------------------------------

    def _build_sampler(self):
        from longrope2.data.mixed import DocumentStore, MixedWindowSampler

        data = self.config.data
        paths = list(data.paths)
        if not paths:  # the embedded books, tokenized once into the output dir
            from longrope2.data.indexed import indexed_exists, prepare_indexed, tokenizer_from_spec

            slug = data.tokenizer.replace(":", "").replace("/", "_")
            prefix = self.output_dir / "data" / f"books.{slug}.{data.min_doc_tokens}-{data.max_doc_tokens}"
            if self.rank == 0 and not indexed_exists(prefix):
                tokenizer, vocab = tokenizer_from_spec(data.tokenizer)
                if vocab > self.model_cfg.vocab_size:
                    raise ValueError(f"tokenizer {data.tokenizer} has {vocab} ids, the model's vocabulary "
                                     f"{self.model_cfg.vocab_size}")
                stats = prepare_indexed(prefix, tokenizer, vocab, (), data.min_doc_tokens, data.max_doc_tokens,
                                        seed=data.seed, progress=False)
                _print0(f"[data] embedded books -> {prefix}: {stats.documents} documents, {stats.tokens} tokens")
            dist.barrier()
            paths = [str(prefix)]
        store = DocumentStore(paths)
        window = self.model_cfg.original_max_position_embeddings
        short = int(((store.lengths >= 2) & (store.lengths <= window)).sum())
        _print0(f"[data] {len(store.lengths)} documents, {int(store.lengths.sum())} tokens; {short} <= the "
                f"original window {window}; short token fraction {data.short_fraction}")
        return MixedWindowSampler(store, self.config.seq_length, window, data.short_fraction, seed=data.seed,
                                  pad_multiple=data.resolved_pad_multiple(self.cp))

    def _build_model_and_optimizer(self):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from longrope2.model.gpt import build_gpt_model

        cfg = self.config
        model = build_gpt_model(self.model_cfg, rope_scaling=self.scaling, params_dtype=self.dtype,
                                sequence_parallel=cfg.parallel.sequence_parallel, seq_length=cfg.seq_length)
        resuming = (self._checkpoint_root() / LATEST).is_file() or cfg.load is not None
        if not resuming:  # before DDP and the optimizer copy the parameters
            layout_independent_init(model, self.model_cfg, cfg.seed)
        if cfg.recompute:
            # read by TransformerBlock at forward time: recompute each layer in the backward pass
            model.config.recompute_granularity = "full"
            model.config.recompute_method = "uniform"
            model.config.recompute_num_layers = 1
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False,
                                                     grad_reduce_in_fp32=True),
            module=model,
        )
        # after the last backward: DP (x CP) grad reduce-scatter, SP norm grads over TP, tied embeddings
        model.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                            clip_grad=o.clip_grad, bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                            use_distributed_optimizer=True),
            [ddp],
        )
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=cfg.train_steps, lr_decay_style="cosine", start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=cfg.train_steps, wd_incr_style="constant",
        )
        return model, ddp, optimizer, scheduler

    # --- one step -------------------------------------------------------------------------------

    def _local_batches(self, step: int):
        first = step * self.config.global_batch_size + self.dp_rank * self.micro_batches
        return [self.sampler[i] for i in range(first, first + self.micro_batches)]

    def _forward_step(self, data_iterator, model):
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = next(data_iterator)
        device = "cuda" if self.on_gpu else "cpu"
        batch = batch.to(device)
        tensors = {"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
                   "position_ids": batch.position_ids}
        if self.cp > 1 and batch.is_short:  # chunks r and 2cp-1-r of every (padded) document
            from longrope2.model.attention import thd_cp_indices

            index = thd_cp_indices(batch.cu_seqlens, self.ps.get_context_parallel_rank(), self.cp)
            tensors = {key: value.index_select(1, index) for key, value in tensors.items()}
        elif self.cp > 1:  # chunks r and 2cp-1-r of the sequence
            tensors = get_batch_on_this_cp_rank(tensors)
        output = model(tensors["tokens"], tensors["position_ids"], attention_mask=None, labels=tensors["labels"],
                       packed_seq_params=batch.packed_seq_params())
        return output, lambda per_token: self._loss(tensors["loss_mask"], per_token)

    def _loss(self, loss_mask: torch.Tensor, per_token: torch.Tensor):
        """Mean next-token loss over the micro-batch's masked tokens (all CP ranks together).

        megatron's schedule multiplies this by the CP size and divides by the micro-batch count;
        DDP averages over DP x CP: the gradient is that of the mean over micro-batches."""
        mask = loss_mask.reshape(-1).float()
        local_sum = (per_token.reshape(-1).float() * mask).sum()
        count = mask.sum()
        report = torch.stack([local_sum.detach(), count])
        if self.cp > 1:
            cp_group = self.ps.get_context_parallel_group()
            dist.all_reduce(count, group=cp_group)
            dist.all_reduce(report, group=cp_group)
        loss = local_sum / count.clamp(min=1)
        # copies: the schedule divides the returned loss in place
        return loss, {"loss": (report[0] / report[1].clamp(min=1)).clone()}

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = self._local_batches(self.step)
        start = time.perf_counter()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches),
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=self.config.seq_length,
            micro_batch_size=1,
            forward_only=False,
        )
        # step t (1-based) runs at the schedule's lr(t): warm-up lr/w, 2 lr/w, ..., lr, then cosine
        # down to min_lr at train_steps (megatron's order, step after update, would spend step 1 at lr 0)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        # the global-batch mean loss lives on the last stage: sum over DP, then send it down the pipeline
        total = torch.zeros(3, dtype=torch.float64, device="cuda" if self.on_gpu else "cpu")
        if self.ps.is_pipeline_last_stage():
            total[0] = sum(float(x["loss"]) for x in losses)
            total[1] = len(losses)
            # FLOPs of this rank's micro-batches, each packed document counted with its own attention
            total[2] = sum(self.model_cfg.flops(_document_lengths(b)) for b in batches)
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        dist.all_reduce(total, group=self.ps.get_pipeline_model_parallel_group())  # zero on other stages
        if self.on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        tokens = self.config.global_batch_size * self.config.seq_length
        shorts = sum(self.sampler.kind(i) == "short" for i in range((self.step - 1) * self.config.global_batch_size,
                                                                      self.step * self.config.global_batch_size))
        metrics = {
            "step": self.step,
            "loss": total[0].item() / total[1].item(),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "update_ok": bool(ok),
            "tokens_per_s": tokens / seconds,
            "step_s": seconds,
            "short_micro_batches": shorts,
        }
        if self.on_gpu:
            metrics["mfu"] = total[2].item() / seconds / (dist.get_world_size() * self.config.peak_tflops * 1e12)
        return metrics

    # --- the loop -------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        cfg = self.config
        history = []
        if self.step >= cfg.train_steps:
            _print0(f"[train] already at step {self.step} of {cfg.train_steps}")
            return history
        _print0(f"[train] {self.model_cfg.name}: tp={self.dims.tp} pp={self.dims.pp} cp={self.dims.cp} "
                f"dp={self.dp} sp={cfg.parallel.sequence_parallel}, {self.micro_batches} micro-batches of "
                f"{cfg.seq_length} tokens per DP rank, {self.dtype}, steps {self.step + 1}..{cfg.train_steps}")
        while self.step < cfg.train_steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.step % cfg.log_interval == 0 or self.step == cfg.train_steps:
                self._log(metrics)
            stop = self._agree_to_stop()
            if stop or (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == cfg.train_steps:
                self.save_checkpoint()
            if stop:
                _print0(f"[train] SIGTERM: saved step {self.step}, stopping")
                break
        return history

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device="cuda" if self.on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _log(self, m: dict) -> None:
        if self.rank != 0:
            return
        mfu = f" mfu {100 * m['mfu']:.1f}%" if "mfu" in m else ""
        print(f"step {m['step']:>6} | loss {m['loss']:.6f} | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.4f} | "
              f"{m['tokens_per_s']:,.0f} tokens/s | {m['short_micro_batches']} short{mfu}", flush=True)
        if self._metrics is None:
            self._metrics = open(self.output_dir / "metrics.jsonl", "a")
        self._metrics.write(json.dumps(m) + "\n")
        self._metrics.flush()
        if self.config.tensorboard and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.config.tensorboard = False
            else:
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self._writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if m.get(key) is not None:
                    self._writer.add_scalar(f"train/{key}", m[key], m["step"])

    # --- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINTS

    def _rng_state(self) -> dict:
        from megatron.core import tensor_parallel

        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if self.on_gpu else None,
                "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def _sharded_state(self, is_loading: bool) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_sd = self.model.sharded_state_dict()
        world, rank = dist.get_world_size(), dist.get_rank()
        return {
            "model": model_sd,
            # megatron-LM's default format: each rank its own buffer shards (reshardable over DP only)
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "sampler_index": self.step * self.config.global_batch_size,
            "layout": {"tp": self.dims.tp, "pp": self.dims.pp, "cp": self.dims.cp, "dp": self.dp},
            "rng": ShardedObject("rng_state", self._rng_state(), (world,), (rank,), replica_id=0),
        }

    def save_checkpoint(self) -> Path:
        from megatron.core import dist_checkpointing

        root = self._checkpoint_root()
        path = root / f"iter_{self.step:07d}"
        if self.rank == 0:
            if path.exists():  # a partial save from a killed run
                import shutil

                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        start = time.perf_counter()
        _preemption_safe_checkpoint_writer()
        dist_checkpointing.save(self._sharded_state(is_loading=False), str(path))
        dist.barrier()
        if self.rank == 0:
            tmp = root / (LATEST + ".tmp")
            tmp.write_text(f"{path.name}\n")
            tmp.replace(root / LATEST)  # last: `latest` only ever names a complete checkpoint
        _print0(f"[ckpt] saved step {self.step} to {path} ({time.perf_counter() - start:.1f} s)")
        return path

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoints/latest`` if there is one: model, optimizer, scheduler, step
        (hence the sampler index) and this rank's RNG. Returns whether it resumed."""
        latest = self._checkpoint_root() / LATEST
        if not latest.is_file():
            return False
        from megatron.core import dist_checkpointing, tensor_parallel

        path = self._checkpoint_root() / latest.read_text().strip()
        self._init_optimizer_state()
        state = dist_checkpointing.load(self._sharded_state(is_loading=True), str(path))
        with torch.no_grad():  # fp32 main params are views of the model's (leaf) parameters
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._restore_adam_steps()
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if state["sampler_index"] != self.step * self.config.global_batch_size:
            raise ValueError(f"checkpoint {path}: sampler index {state['sampler_index']} does not match step "
                             f"{self.step} x global batch {self.config.global_batch_size} (global batch changed?)")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.on_gpu and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        _print0(f"[ckpt] resumed from {path} at step {self.step} (saved with layout {state['layout']})")
        return True

    def _init_optimizer_state(self) -> None:
        """Empty Adam state (with ``step``) for every parameter, to load into. megatron's own
        ``init_state_fn`` leaves out ``step``, which its DistributedOptimizer.state_dict asserts
        on when neither apex nor TE provides the Adam (torch's Adam)."""
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in (o.optimizer for o in inner):
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state[p]
                    if len(state) == 0:
                        state["exp_avg"] = torch.zeros_like(p.data)
                        state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state.setdefault("step", torch.tensor(0.0))

    def _restore_adam_steps(self) -> None:
        """Per-parameter Adam ``step`` tensors from the loaded param groups' ``step``.

        megatron's DistributedOptimizer (torch-Adam path, no apex/TE) keeps the Adam step in its
        param groups; on load it leaves the per-parameter ``step`` state at the pre-load value
        (0 here) or gives all parameters one shared tensor, which torch's foreach Adam increments
        once per parameter. Either breaks the bias correction after a resume; found by the
        SIGKILL + resume test (steps after the first diverged)."""
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in (o.optimizer for o in inner):
            for group in opt.param_groups:
                step = float(group.get("step", self.step))
                for p in group["params"]:
                    if "step" in opt.state[p]:
                        opt.state[p]["step"] = torch.tensor(step)

    def _load_weights(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        latest = path / LATEST
        if latest.is_file():
            path = path / latest.read_text().strip()
        state = dist_checkpointing.load({"model": self.model.sharded_state_dict()}, str(path))
        self.model.load_state_dict(state["model"])
        # the optimizer's main (fp32) weights are a copy made when it was built (bf16 runs):
        # refresh them, or the first step would put the random init back
        self.optimizer.reload_model_params()
        _print0(f"[ckpt] weights from {path}")

    # --- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        from longrope2.parallel import destroy_parallel

        signal.signal(signal.SIGTERM, self._previous_handler)
        if self._writer is not None:
            self._writer.close()
        if self._metrics is not None:
            self._metrics.close()
        destroy_parallel()


def _document_lengths(batch) -> list[int]:
    """The attention segments of a micro-batch: real document lengths of a packed one, else S."""
    cu = batch.cu_seqlens_unpadded if batch.cu_seqlens_unpadded is not None else batch.cu_seqlens
    return (cu[1:] - cu[:-1]).tolist()


def train(config: TrainConfig) -> list[dict]:
    """Build, train, close (also on failure)."""
    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        elif dist.is_initialized():
            from longrope2.parallel import destroy_parallel

            destroy_parallel()


def main(argv: Optional[list[str]] = None) -> int:
    """``longrope2 train --config X`` and ``launch/train.py``: parse, check, build, train, close."""
    import argparse

    parser = argparse.ArgumentParser(description="mixed context window training (run under torchrun)")
    parser.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_yaml(args.config)
        config.check(int(os.environ.get("WORLD_SIZE", "1")))  # clear errors before any work
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0
