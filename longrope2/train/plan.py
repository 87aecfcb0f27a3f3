"""``--dry-run``: the parallel layout, the micro-batch plan and a per-GPU memory estimate of a
training run or a search, without building a model or starting a process group (CPU, seconds).

Memory per GPU (bytes; ``e`` = bytes of the training dtype, 2 for bf16):

* **weights, grads, optimizer** (megatron's DistributedOptimizer, ``grad_reduce_in_fp32`` as the
  trainer sets it): bf16 weights 2 + fp32 grads 4 per parameter on every rank, fp32 main weights
  and Adam m, v 12 per parameter sharded over the ``dp * cp`` ranks that hold the same shard
  ("6 + 12/d" bytes per parameter). fp32 runs: 4 + 4 + 8/d (no separate main copy). Parameters
  per rank are those of the largest pipeline stage after the tensor-parallel split.
* **activations**, per layer and token, following Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", section 4): the GPT layer stores
  ``s b h (34 + 5 a s / h)`` bytes; with TP ``s b h (10 + 24/t + 5 a s/(h t))``; with TP + SP all
  of it over ``t``; with full recompute only the layer input, ``2 s b h / t`` (SP). The same
  accounting, term by term, for a LLaMA layer: RMSNorm inputs, the QKV/MLP inputs, Q and the GQA
  K, V, the attention output, SwiGLU's fc1 output (``2 f`` wide) and fc2 input (``f``); no
  dropout; a flash/fused attention kernel (TransformerEngine) keeps no ``s x s`` scores, only an
  fp32 log-sum-exp per head and token. Context parallelism divides the tokens by ``cp``. 1F1B
  keeps ``min(pp, micro-batches)`` micro-batches in flight on the first stage (Korthikanti: the
  first stage holds ``L`` layers' worth whatever ``pp`` is). Full recompute also needs one
  layer's full activations while that layer's backward runs.
* **logits** on the last stage: megatron's vocab-parallel cross-entropy casts the bf16 logits to
  fp32 and works in place, so ``(e + 4) * vocab / t`` bytes per token at the peak.
* **overhead**: a fixed 3 GiB for the CUDA context, NCCL buffers and cuBLAS/TE workspaces.

Allocator fragmentation is not modelled: the verdict is "fits" up to 90% of the device memory,
"tight" up to 100%, "does NOT fit" above.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

GIB = 1024**3
OVERHEAD_BYTES = 3 * GIB
FITS_FRACTION = 0.9
# data/mixed.py: micro-batch i is short when floor((i+1) f) > floor(i f), f on this grid
_FRACTION_DENOMINATOR = 1_000_000


# --- the formulas ---------------------------------------------------------------------------------


def korthikanti_gpt_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                                recompute: str = "none") -> float:
    """The paper's closed forms for one GPT layer in 16-bit (Korthikanti et al. 2022, Table 2):
    ``recompute`` is none, selective (attention scores recomputed) or full."""
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    scores = 0.0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + (24 + scores) / t)


@dataclass(kw_only=True)
class LayerShape:
    """What one transformer layer's activations depend on."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool = True
    """SwiGLU (fc1 is ``2 ffn`` wide) or GeLU (``ffn``)."""
    dropout: bool = False
    flash: bool = True
    """A fused attention kernel that keeps no ``s x s`` scores (TE / flash-attn)."""


def layer_activation_bytes(shape: LayerShape, tokens: int, seq: int, t: int = 1, sequence_parallel: bool = False,
                           e: int = 2) -> float:
    """Bytes one layer keeps for its backward pass, for ``tokens`` tokens of this rank (``s b / cp``)
    of sequences of ``seq`` tokens (the attention span), dtype of ``e`` bytes. Korthikanti's
    accounting; with GPT's shape (ffn 4h, MHA, dropout, no flash) it is the paper's formula."""
    h, q_width, kv_width = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mask = 1 if shape.dropout else 0
    # replicated across TP ranks unless sequence parallel: two norm inputs, the QKV and fc1 inputs,
    # the two hidden dropout masks
    replicated = e * 2 * h + e * h + e * h + 2 * mask * h
    # split over TP: Q, K, V, the attention output (proj input), fc1 output, fc2 input
    fc1 = 2 * shape.ffn if shape.gated else shape.ffn
    split = e * q_width + 2 * e * kv_width + e * q_width + e * fc1 + e * shape.ffn
    if shape.flash:
        split += 4 * shape.heads  # fp32 log-sum-exp per head
    else:  # softmax output (+ dropout mask and output): (2e + 1) a s with dropout, e a s without
        split += ((2 * e + 1) if shape.dropout else e) * shape.heads * seq
    per_token = replicated / (t if sequence_parallel else 1) + split / t
    return tokens * per_token


def distributed_optimizer_bytes_per_param(dtype_bytes: int, shards: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter with megatron's DistributedOptimizer and fp32
    gradient buffers: bf16 -> 2, 4, 12 / shards ("6 + 12/d"); fp32 -> 4, 4, 8 / shards."""
    if dtype_bytes == 2:
        return 2.0, 4.0, 12.0 / shards
    return 4.0, 4.0, 8.0 / shards


def stage_parameters(model, tp: int, pp: int) -> list[int]:
    """Parameters each pipeline stage's TP rank holds (norms replicated, the rest split by tp)."""
    h, d = model.hidden_size, model.head_dim
    attn = h * d * (2 * model.num_attention_heads + 2 * model.num_query_groups) // tp
    mlp = 3 * h * model.ffn_hidden_size // tp
    layer = attn + mlp + 2 * h
    per_stage = model.num_layers // pp
    embed = model.vocab_size * h // tp
    stages = []
    for stage in range(pp):
        n = per_stage * layer
        if stage == 0:
            n += embed
        if stage == pp - 1:
            n += h  # final norm
            if not (model.tie_word_embeddings and pp == 1):
                n += embed  # output layer (a tied one is a copy on the last stage when pp > 1)
        stages.append(n)
    return stages


# --- the plan -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    """Stored for the backward pass (or the live forward working set for the search)."""
    working: float
    """One layer's full activations while it is recomputed (full recompute)."""
    logits: float
    overhead: float = OVERHEAD_BYTES
    device_bytes: float = 80 * GIB
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.working + self.logits + self.overhead

    @property
    def verdict(self) -> str:
        if self.total <= FITS_FRACTION * self.device_bytes:
            return "fits"
        return "tight" if self.total <= self.device_bytes else "does NOT fit"

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def lines(self) -> list[str]:
        rows = [("weights", self.weights), ("gradients", self.grads), ("optimizer (fp32 main + Adam)", self.optimizer),
                ("activations", self.activations), ("recompute working layer", self.working),
                ("logits + cross-entropy", self.logits), ("CUDA/NCCL overhead", self.overhead)]
        out = [f"  {name:<30} {value / GIB:8.2f} GiB" for name, value in rows if value]
        out.append(f"  {'total':<30} {self.total / GIB:8.2f} GiB of {self.device_bytes / GIB:.0f} GiB "
                   f"({100 * self.total / self.device_bytes:.0f}%) -> {self.verdict}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2  # "auto" = bf16 on the GPUs this plans for


def _dtype_label(name: str) -> str:
    return "bfloat16 (auto: bf16 on GPU)" if name == "auto" else name


def _layer_shape(model) -> LayerShape:
    return LayerShape(hidden=model.hidden_size, ffn=model.ffn_hidden_size, heads=model.num_attention_heads,
                      kv_heads=model.num_query_groups, head_dim=model.head_dim)


def _logit_bytes(model, tokens: int, tp: int, e: int) -> float:
    return tokens * model.vocab_size / tp * (e + 4 if e < 4 else 4)


def train_memory(config, dims, model, device_gib: float = 80.0) -> Memory:
    """Per-GPU memory of the busiest rank of a ``TrainConfig`` under ``dims`` (the pipeline stage
    with the largest total: the first holds ``min(pp, micro-batches)`` in flight, the last the logits)."""
    e = _dtype_bytes(config.dtype)
    t, p, cp, sp = dims.tp, dims.pp, dims.cp, dims.sequence_parallel
    w, g, o = distributed_optimizer_bytes_per_param(e, dims.dp * cp)
    micro = config.global_batch_size // dims.dp
    tokens = config.seq_length // cp  # b = 1: one sequence per micro-batch
    full = layer_activation_bytes(_layer_shape(model), tokens, config.seq_length, t, sp, e)
    hidden = e * tokens * model.hidden_size / (t if sp else 1)  # one [s, b, h] tensor on this rank
    per_layer = hidden if config.recompute else full  # full recompute keeps only each layer's input
    layers = model.num_layers // p
    notes = []
    if not sp and t > 1:
        notes.append("sequence_parallel off: norm inputs and QKV/MLP inputs are replicated on every TP rank")
    best = None
    for stage, params in enumerate(stage_parameters(model, t, p)):
        in_flight = min(p - stage, micro)
        last = stage == p - 1
        memory = Memory(weights=params * w, grads=params * g, optimizer=params * o,
                        activations=layers * in_flight * per_layer + (2 * hidden if last else 0),
                        working=full if config.recompute else 0,
                        logits=_logit_bytes(model, tokens, t, e) if last else 0,
                        device_bytes=device_gib * GIB, notes=notes + ([f"pipeline stage {stage} of {p}"] if p > 1 else []))
        if best is None or memory.total > best.total:
            best = memory
    return best


def short_micro_batches(count: int, short_fraction: float) -> int:
    """Short micro-batches among the first ``count`` (the sampler's exact, evenly spread mix)."""
    num = round(short_fraction * _FRACTION_DENOMINATOR)
    return count * num // _FRACTION_DENOMINATOR


def resolve_world_size(nodes: Optional[int], gpus_per_node: Optional[int], world_size: Optional[int] = None) -> int:
    """``--world-size``, else ``--nodes x --gpus-per-node``, else the launcher's environment
    (WORLD_SIZE; Slurm's SLURM_NNODES x NPROC_PER_NODE/SLURM_GPUS_ON_NODE), else 1."""
    if world_size is not None:
        return world_size
    if nodes is not None or gpus_per_node is not None:
        return (nodes or 1) * (gpus_per_node or 1)
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NNODES" in os.environ:
        per_node = os.environ.get("NPROC_PER_NODE") or os.environ.get("SLURM_GPUS_ON_NODE") or "1"
        return int(os.environ["SLURM_NNODES"]) * int(per_node)
    return 1


def _layout_lines(dims, world: int, gpus_per_node: Optional[int]) -> list[str]:
    nodes = ""
    if gpus_per_node and world % gpus_per_node == 0:
        count = world // gpus_per_node
        nodes = f" = {count} node{'s' if count > 1 else ''} x {gpus_per_node}"
    lines = [f"layout: world {world}{nodes}: tp={dims.tp} pp={dims.pp} cp={dims.cp} dp={dims.dp} "
             f"sequence_parallel={dims.sequence_parallel}",
             f"  a model replica spans tp*pp*cp = {dims.model_parallel_size} GPUs; sequence lengths must divide "
             f"by {dims.seq_len_divisor}"]
    if gpus_per_node and dims.tp > gpus_per_node:
        lines.append(f"  warning: tp={dims.tp} > {gpus_per_node} GPUs per node: tensor parallelism across nodes")
    return lines


def plan_train(config, world: int, gpus_per_node: Optional[int] = None, device_gib: float = 80.0):
    """(text lines, Memory) of a ``TrainConfig`` on ``world`` GPUs; raises ValueError on a bad layout."""
    model = config.model_config()
    dims = config.parallel_dims(world, model)
    if config.data.short_fraction is None:
        raise ValueError(f"data.manifest {config.data.manifest} is not built yet, so the short fraction is unknown: "
                         "set data.short_fraction to plan before building the mix")
    lines = [f"dry run: {model.name} ({model.num_parameters() / 1e9:.2f}B parameters), "
             f"seq_length {config.seq_length:,}, dtype {_dtype_label(config.dtype)}"]
    lines += _layout_lines(dims, world, gpus_per_node)
    g, s, steps = config.global_batch_size, config.seq_length, config.train_steps
    micro = g // dims.dp
    total_micro = g * steps
    shorts = short_micro_batches(total_micro, config.data.short_fraction)
    per_step = [short_micro_batches((i + 1) * g, config.data.short_fraction) -
                short_micro_batches(i * g, config.data.short_fraction) for i in range(min(steps, 10_000))]
    lines += [
        "micro-batches:",
        f"  {g} per step over {dims.dp} DP ranks = {micro} per DP rank per step (one sequence each, "
        f"{'1F1B over ' + str(dims.pp) + ' stages' if dims.pp > 1 else 'gradient accumulation'})",
        f"  {s:,} tokens per micro-batch, {s // dims.cp:,} per CP rank; {g * s:,} tokens per step",
        f"  short (packed, original RoPE): {config.data.short_fraction:.0%} -> {_span(per_step)} "
        f"micro-batches per step, {shorts * s:,} tokens; long (rescaled RoPE): {(total_micro - shorts) * s:,} tokens",
        f"  {steps:,} steps -> {total_micro * s:,} tokens ({total_micro * s / 1e9:.2f}B)",
    ]
    memory = train_memory(config, dims, model, device_gib)
    recompute = "full recompute" if config.recompute else "no recompute"
    lines.append(f"memory per GPU (estimate; {recompute}, DistributedOptimizer over dp*cp={dims.dp * dims.cp}):")
    lines += memory.lines()
    return lines, memory


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _search_model(config):
    from longrope2.model.config import ModelConfig

    if config.checkpoint is None:
        return ModelConfig.from_yaml(config.model) if config.model.endswith((".yaml", ".yml")) \
            else ModelConfig.from_name(config.model)
    if config.checkpoint == "smollm2":
        return ModelConfig.from_name("smollm2_135m")
    path = os.path.join(config.checkpoint, "config.json")
    if os.path.isfile(path):
        import json

        with open(path) as f:
            return ModelConfig.from_hf_config(json.load(f), name=config.checkpoint)
    raise ValueError(f"dry run: cannot read the architecture of checkpoint {config.checkpoint!r} "
                     "(an HF folder with config.json, or smollm2)")


def plan_search(config, world: int, gpus_per_node: Optional[int] = None, device_gib: float = 80.0,
                throughputs: Optional[list["Throughput"]] = None):
    """(text lines, Memory) of a ``SearchConfig``: workers, candidates, scored tokens, the ETA
    at each of ``throughputs`` (default: the stated GPU rate), and the forward-only memory of one
    worker rank (weights + one layer's live activations)."""
    throughputs = throughputs or [stated_throughput()]
    from longrope2.parallel.layout import ParallelDims

    model = _search_model(config)
    par = config.parallel
    dims = ParallelDims(tp=par.tp, pp=par.pp, cp=par.cp, world_size=world)
    dims.validate(model, seq_len=config.target_length)
    ev = config.evolution
    from longrope2.rope import ten_period_dim, theoretical_critical_dim
    from longrope2.search.evolution import SearchSpace

    geometry = model.rope_geometry
    window = geometry.original_max_position_embeddings
    SearchSpace(dim=geometry.rotary_dim, base=geometry.rope_theta, original_length=window,
                target_length=config.target_length, grid=config.grid,
                min_critical_dim=config.min_critical_dim or ten_period_dim(geometry.rotary_dim, geometry.rope_theta, window),
                max_critical_dim=config.max_critical_dim or theoretical_critical_dim(geometry.rotary_dim,
                                                                                     geometry.rope_theta, window),
                ).check_population(ev.population_size)
    candidates = ev.population_size + ev.iterations * (ev.mutants + ev.crossovers) + len(config.baselines)
    documents = config.needle.documents * len(config.needle.depths)
    heldout = (1 + len(config.baselines)) * config.needle.heldout_documents * len(config.needle.heldout_depths)
    forwards = candidates * documents + heldout
    tokens = forwards * config.target_length
    lines = [f"dry run (search): {model.name} ({model.num_parameters() / 1e9:.2f}B parameters), "
             f"needle documents of {config.target_length:,} tokens, {config.dtype}"]
    lines += _layout_lines(dims, world, gpus_per_node)
    halving = config.halving
    bound = "at most " if halving.rungs else ""
    lines += [
        "work:",
        f"  {dims.dp} workers pull candidates from a shared counter; {candidates} candidates "
        f"({ev.population_size} initial + {ev.iterations} x {ev.mutants + ev.crossovers} + "
        f"{len(config.baselines)} baselines) x {documents} documents",
        f"  then the best and the baselines on held-out documents: {heldout} document-forwards",
        f"  {bound}{forwards:,} document-forwards, {bound}{tokens:,} forward tokens in all, about "
        f"{tokens // dims.dp:,} per worker",
    ]
    if halving.rungs:
        lines.append(f"  successive halving after documents {halving.rungs} (margin {halving.margin:g}) stops "
                     "hopeless candidates early: the real count is lower")
    # 10 answer tokens per document is generous (RULER-style 7-digit numbers are 7-8 tokens)
    flops = forwards * model.forward_flops(config.target_length, lm_head_tokens=10)
    per_worker = dims.tp * dims.pp * dims.cp
    lines.append(f"cost: {flops / 1e15:,.1f} PFLOP of forwards; ETA with every worker busy and ideal "
                 f"scaling over its {per_worker} GPU{'s' if per_worker > 1 else ''}:")
    for rate in throughputs:
        seconds = search_seconds(model, config.target_length, forwards, rate) / (dims.dp * per_worker)
        lines.append(f"  {_duration(seconds)} at {rate.source}")
    e = _dtype_bytes(config.dtype)
    params = max(stage_parameters(model, dims.tp, dims.pp))
    local = config.target_length // dims.cp
    shape = _layer_shape(model)
    # forward only: the residual stream + one layer's activations live at a time
    live = e * local * model.hidden_size * 2 + layer_activation_bytes(shape, local, config.target_length, dims.tp,
                                                                      False, e)
    memory = Memory(weights=params * e, grads=0, optimizer=0, activations=live, working=0,
                    logits=0, device_bytes=device_gib * GIB,
                    notes=["the LM head runs only at the answer positions: logits are negligible"])
    lines.append("memory per GPU (estimate, forward only):")
    lines += memory.lines()
    return lines, memory


# --- search cost: FLOPs and throughput --------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Achieved FLOP/s of one device on a decoder layer's matmuls and on causal attention."""

    linear: float
    attention: float
    source: str


def stated_throughput(tflops: float = 989.0, mfu: float = 0.25) -> Throughput:
    """A GPU's dense peak (H100 SXM bf16: 989 TFLOP/s; A100: 312) at a model FLOPs utilisation;
    25% is what nnScaler's published LLaMA3-8B 128k training reaches (``../shared/DESIGN.md``);
    a forward-only prefill usually does better, so the ETA errs long."""
    rate = tflops * 1e12 * mfu
    return Throughput(rate, rate, f"{tflops:g} TFLOP/s per GPU x {mfu:.0%} MFU (stated: --gpu-tflops, --mfu)")


def probe_throughput(model, dtype: str, tokens: int = 1024) -> Throughput:
    """Measured here: one decoder layer of ``model``'s shapes (random weights) at ``tokens``
    tokens on this machine's device (the GPU if there is one), its matmuls and its causal SDPA
    timed apart, the faster of two runs after a warm-up. Norms, rotary and the rest are left
    out, so the ETA errs short by their share."""
    import time

    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = getattr(torch, dtype)
    h, f, heads, kv, d = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, \
        model.num_query_groups, model.head_dim
    shapes = [(heads * d, h), (2 * kv * d, h), (h, heads * d), (2 * f, h), (h, f)]
    weights = [torch.randn(shape, dtype=kind, device=device) * 0.02 for shape in shapes]
    x = torch.randn(tokens, h, dtype=kind, device=device)
    q = torch.randn(1, heads, tokens, d, dtype=kind, device=device)
    k, v = (torch.randn(1, kv, tokens, d, dtype=kind, device=device) for _ in range(2))

    def linear():
        projected = F.linear(x, weights[0])  # q; it also stands in for the attention output
        F.linear(x, weights[1])
        F.linear(projected, weights[2])
        F.linear(F.linear(x, weights[3])[:, :f], weights[4])

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def seconds(fn) -> float:
        best = math.inf
        for run in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if run:  # the first run is the warm-up
                best = min(best, time.perf_counter() - start)
        return best

    with torch.no_grad():
        linear_flops = 2.0 * tokens * sum(a * b for a, b in shapes)
        attention_flops = 2.0 * heads * d * tokens * tokens
        rate = Throughput(linear_flops / seconds(linear), attention_flops / seconds(attention), "")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    return Throughput(rate.linear, rate.attention,
                      f"the rate measured here (--probe: {name}, {dtype}, one layer at {tokens:,} tokens: "
                      f"matmuls {rate.linear / 1e9:,.0f} GFLOP/s, attention {rate.attention / 1e9:,.0f} GFLOP/s)")


def search_seconds(model, target_length: int, forwards: int, rate: Throughput) -> float:
    """Device-seconds of ``forwards`` needle documents: matmul FLOPs at ``rate.linear``,
    causal attention FLOPs (quadratic in the length) at ``rate.attention``."""
    attention = 2.0 * model.num_layers * model.num_attention_heads * model.head_dim * target_length**2
    linear = model.forward_flops(target_length, lm_head_tokens=10) - attention
    return forwards * (linear / rate.linear + attention / rate.attention)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- the command line -----------------------------------------------------------------------------


def add_dry_run_args(parser: argparse.ArgumentParser, search: bool = False) -> None:
    group = parser.add_argument_group("dry run (no model, no process group)")
    if search:
        group.add_argument("--gpu-tflops", type=float, default=989.0,
                           help="dry run: dense peak TFLOP/s per GPU for the ETA (default 989, H100 bf16; A100 312)")
        group.add_argument("--mfu", type=float, default=0.25, help="dry run: model FLOPs utilisation (default 0.25)")
        group.add_argument("--probe", action="store_true",
                           help="dry run: also an ETA from one layer timed on this machine (seconds)")
        group.add_argument("--probe-tokens", type=int, default=1024, help="dry run: tokens of the probe layer")
    group.add_argument("--dry-run", action="store_true",
                       help="print the layout, micro-batch plan and per-GPU memory estimate, then exit")
    group.add_argument("--nodes", type=int, help="dry run: nodes (default: WORLD_SIZE or Slurm's environment)")
    group.add_argument("--gpus-per-node", type=int, help="dry run: GPUs per node")
    group.add_argument("--world-size", type=int, help="dry run: total GPUs (instead of --nodes/--gpus-per-node)")
    group.add_argument("--gpu-memory-gib", type=float, default=80.0, help="dry run: device memory (default 80)")


def throughputs_from_args(args: argparse.Namespace, search_config) -> list[Throughput]:
    """The ETA rates a search dry run asked for: the stated GPU rate, and the probe with ``--probe``."""
    if not (args.gpu_tflops > 0 and 0 < args.mfu <= 1 and args.probe_tokens > 0):
        raise ValueError(f"--gpu-tflops must be > 0, --mfu in (0, 1], --probe-tokens > 0; got "
                         f"{args.gpu_tflops:g}, {args.mfu:g}, {args.probe_tokens}")
    rates = [stated_throughput(args.gpu_tflops, args.mfu)]
    if args.probe:
        rates.append(probe_throughput(_search_model(search_config), search_config.dtype, args.probe_tokens))
    return rates


def dry_run(kind: str, args: argparse.Namespace) -> int:
    """``--dry-run`` of ``train`` or ``search``: prints the plan; 0 if it fits, 1 if it does not,
    2 on a bad config or layout."""
    world = resolve_world_size(args.nodes, args.gpus_per_node, args.world_size)
    try:
        if kind == "train":
            from longrope2.train.config import TrainConfig

            config = TrainConfig.from_yaml(args.config)
            lines, memory = plan_train(config, world, args.gpus_per_node, args.gpu_memory_gib)
            try:  # what the launch also needs here: the factor file and the data
                config.check(world)
                lines.append("launch checks (factors, data files): ok")
            except (ValueError, FileNotFoundError) as error:
                lines.append(f"launch checks: {error} (needed on the cluster, not for this plan)")
        else:
            from longrope2.search.run import SearchConfig

            overrides = {"output_dir": args.output_dir} if getattr(args, "output_dir", None) else {}
            if getattr(args, "checkpoint", None):
                overrides["checkpoint"] = args.checkpoint
            config = SearchConfig.from_yaml(args.config, overrides)
            lines, memory = plan_search(config, world, args.gpus_per_node, args.gpu_memory_gib,
                                        throughputs_from_args(args, config))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if memory.fits else 1
