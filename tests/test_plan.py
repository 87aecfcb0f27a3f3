"""``--dry-run`` (longrope2/train/plan.py): layouts, micro-batch plans and per-GPU memory estimates,
checked against hand-computed numbers and the closed forms of Korthikanti et al. 2022."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from longrope2.cli import main as cli_main
from longrope2.model.config import ModelConfig
from longrope2.parallel.layout import ParallelDims
from longrope2.train import plan
from longrope2.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _llama_config(**parallel) -> TrainConfig:
    config = TrainConfig.from_yaml(ROOT / "configs/llama3_8b_128k.yaml")
    for key, value in parallel.items():
        if key == "recompute":
            config.recompute = value
        else:
            setattr(config.parallel, key, value)
    return config


def test_llama3_8b_parameters_and_optimizer_bytes_by_hand():
    model = ModelConfig.from_name("llama3_8b")
    assert model.num_parameters() == 8_030_261_248  # Meta-Llama-3-8B: 8.03B
    # tp=8: per layer q,k,v,o 4096*128*(32+8+8+32)/8 + SwiGLU 3*4096*14336/8 + two RMSNorms 2*4096
    layer = 4096 * 128 * 80 // 8 + 3 * 4096 * 14336 // 8 + 2 * 4096
    per_rank = 32 * layer + 2 * 128256 * 4096 // 8 + 4096  # + embedding, output layer, final norm
    assert plan.stage_parameters(model, tp=8, pp=1) == [per_rank] == [1_004_015_616]
    # megatron's DistributedOptimizer with bf16 weights and fp32 grads: 6 + 12/d bytes per parameter
    assert plan.distributed_optimizer_bytes_per_param(2, 8) == (2.0, 4.0, 1.5)
    assert plan.distributed_optimizer_bytes_per_param(4, 4) == (4.0, 4.0, 2.0)
    config = _llama_config()
    dims = ParallelDims(tp=8, pp=1, cp=1, sequence_parallel=True, world_size=64)
    memory = plan.train_memory(config, dims, model)
    assert (memory.weights, memory.grads, memory.optimizer) == (2 * per_rank, 4 * per_rank, 1.5 * per_rank)
    # one unsharded replica: 18 bytes per parameter, 8.03B x 18 = 144.5 GB -- why the DP sharding matters
    assert sum(plan.distributed_optimizer_bytes_per_param(2, 1)) * model.num_parameters() / 1e9 == \
        pytest.approx(144.54, abs=0.01)


def test_activation_accounting_reproduces_korthikanti_closed_forms():
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B's layer, the paper's running example
    gpt = plan.LayerShape(hidden=h, ffn=4 * h, heads=a, kv_heads=a, head_dim=h // a, gated=False, dropout=True,
                          flash=False)
    for t, sp in ((1, False), (8, False), (8, True)):
        ours = plan.layer_activation_bytes(gpt, s * b, s, t, sp)
        assert ours == pytest.approx(plan.korthikanti_gpt_layer_bytes(s, b, h, a, t, sp, "none"), rel=1e-12)
    # no parallelism: sbh(34 + 5as/h)
    assert plan.korthikanti_gpt_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    # a fused attention kernel = selective recompute (no s x s scores), plus the fp32 log-sum-exp
    flash = plan.LayerShape(**{**gpt.__dict__, "flash": True})
    ours = plan.layer_activation_bytes(flash, s * b, s, 8, True) - s * b * 4 * a / 8
    assert ours == pytest.approx(plan.korthikanti_gpt_layer_bytes(s, b, h, a, 8, True, "selective"), rel=1e-12)
    assert plan.korthikanti_gpt_layer_bytes(s, b, h, a, 8, True, "full") == 2 * s * b * h / 8


def test_llama3_8b_128k_on_64_gpus_fits_80gb(capsys):
    rc = cli_main(["train", "--config", str(ROOT / "configs/llama3_8b_128k.yaml"), "--dry-run",
                   "--nodes", "8", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "world 64 = 8 nodes x 8: tp=8 pp=1 cp=1 dp=8 sequence_parallel=True" in out
    assert "64 per step over 8 DP ranks = 8 per DP rank per step" in out
    assert "1,192 steps -> 9,999,220,736 tokens" in out  # 1192 x 64 x 131072 (paper: 10B)
    assert "-> fits" in out
    model = ModelConfig.from_name("llama3_8b")
    dims = ParallelDims(tp=8, pp=1, cp=1, sequence_parallel=True, world_size=64)
    memory = plan.train_memory(_llama_config(), dims, model)
    # full recompute + SP: each of the 32 layers keeps its bf16 input, 131072 x 4096 / 8 x 2 bytes = 128 MiB
    hidden = 2 * 131072 * 4096 / 8
    assert memory.activations == 32 * hidden + 2 * hidden
    # vocab-parallel cross-entropy: bf16 logits + fp32 copy, 131072 x 128256 / 8 x 6 bytes = 11.74 GiB
    assert memory.logits == 131072 * 128256 / 8 * 6
    assert memory.total < 0.9 * 80 * GIB
    assert memory.total / GIB == pytest.approx(28.13, abs=0.01)


def test_phi3_mini_128k_on_64_gpus_fits_80gb(capsys):
    rc = cli_main(["train", "--config", str(ROOT / "configs/phi3_mini_128k.yaml"), "--dry-run", "--world-size", "64"])
    assert rc == 0
    assert "tp=4 pp=1 cp=1 dp=16" in capsys.readouterr().out


def test_a_layout_that_does_not_fit_says_so(capsys):
    config = _llama_config(tp=1, sequence_parallel=False, recompute=False)
    lines, memory = plan.plan_train(config, world=64)
    assert not memory.fits and memory.verdict == "does NOT fit"
    assert "does NOT fit" in "\n".join(lines)
    # no TP, no recompute: every layer keeps its norm/QKV/MLP inputs (8h bf16 bytes per token), Q, K, V
    # and the attention output (2h + 2 x 2 x 1024 + 2h), SwiGLU's fc1 output and fc2 input (6 x 14336)
    # and the flash kernel's fp32 log-sum-exp (4 x 32): 546 GiB for one 128k sequence
    per_token = 8 * 4096 + 2 * 4096 + 4 * 1024 + 2 * 4096 + 6 * 14336 + 4 * 32
    assert memory.activations == 32 * 131072 * per_token + 2 * 2 * 131072 * 4096
    assert memory.activations / GIB == pytest.approx(546.5, abs=0.1)
    assert plan.Memory(weights=75 * GIB, grads=0, optimizer=0, activations=0, working=0, logits=0).verdict == "tight"


def test_bad_layouts_fail_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match="world size 60 is not divisible by tp\\*pp\\*cp = 8\\*1\\*1 = 8"):
        plan.plan_train(_llama_config(), world=60)
    with pytest.raises(ValueError, match=r"sequence length 131072 not divisible by 48 \(2\*cp=6 x tp=8"):
        plan.plan_train(_llama_config(cp=3), world=48)
    with pytest.raises(ValueError, match="global_batch_size 64 not divisible by dp=128"):
        plan.plan_train(_llama_config(), world=1024)
    with pytest.raises(ValueError, match="attention heads 32 not divisible by tp=3"):
        plan.plan_train(_llama_config(tp=3, sequence_parallel=False), world=3)
    rc = cli_main(["train", "--config", str(ROOT / "configs/llama3_8b_128k.yaml"), "--dry-run", "--world-size", "12"])
    assert rc == 2 and "error: world size 12 is not divisible" in capsys.readouterr().err


def test_micro_batch_plan_counts_the_samplers_short_mix():
    # data/mixed.py: micro-batch i is short when floor((i+1) f) > floor(i f)
    f = 0.2
    assert plan.short_micro_batches(64, f) == sum(int((i + 1) * f) > int(i * f) for i in range(64)) == 12
    lines, _ = plan.plan_train(_llama_config(), world=64)
    text = "\n".join(lines)
    assert "12-13 micro-batches per step" in text
    assert "1,999,765,504 tokens; long (rescaled RoPE): 7,999,455,232 tokens" in text


def test_context_parallel_splits_tokens_and_shards_the_optimizer_wider():
    model = ModelConfig.from_name("llama3_8b")
    base = plan.train_memory(_llama_config(), ParallelDims(tp=8, sequence_parallel=True, world_size=64), model)
    cp = plan.train_memory(_llama_config(tp=4, cp=2), ParallelDims(tp=4, cp=2, sequence_parallel=True, world_size=64),
                           model)
    # tp=4 x cp=2: the same 8 tokens-per-GPU share of a 128k sequence as tp=8 ...
    assert cp.activations == pytest.approx(base.activations)
    # ... while twice the weights per GPU are sharded over dp*cp = 16 instead of 8
    assert cp.optimizer == pytest.approx(plan.stage_parameters(model, 4, 1)[0] * 12 / 16)


def test_search_dry_run(capsys):
    rc = cli_main(["search", "--config", str(ROOT / "configs/search/smollm2_32k_gpu.yaml"), "--dry-run",
                   "--nodes", "1", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "8 workers pull candidates" in out
    assert "132 candidates (32 initial + 6 x 16 + 4 baselines) x 4 documents" in out
    # the best and the 4 baselines on the default held-out set: 2 documents x 2 depths
    assert "then the best and the baselines on held-out documents: 20 document-forwards" in out
    assert f"{132 * 4 + 20:,} document-forwards, {(132 * 4 + 20) * 32768:,} forward tokens" in out
    model = ModelConfig.from_name("smollm2_135m")
    assert f"{'weights':<30} {model.num_parameters() * 4 / GIB:8.2f} GiB" in out  # fp32, one GPU per worker


def test_launch_train_dry_run_builds_nothing():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config",
                           str(ROOT / "configs/llama3_8b_128k.yaml"), "--dry-run", "--nodes", "8",
                           "--gpus-per-node", "8"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "memory per GPU" in proc.stdout and "-> fits" in proc.stdout
    assert "Transformer Engine" not in proc.stderr  # megatron-core was never imported (its import warns)
    assert time.monotonic() - start < 60


def test_micro_batch_flops_count_each_packed_document_alone():
    """LLaMA3-8B: a long 8k micro-batch is 8,192 x flops_per_token(8,192); the same 8k tokens as
    four packed 2k documents cost less by exactly the attention they do not compute
    (6 x layers x heads x head_dim x (8,192^2 - 4 x 2,048^2))."""
    from longrope2.model.config import ModelConfig

    cfg = ModelConfig.from_name("llama3_8b")
    long = cfg.flops([8192])
    packed = cfg.flops([2048] * 4)
    assert long == 8192 * cfg.flops_per_token(8192)
    attention = 6 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim
    assert long - packed == pytest.approx(attention * (8192**2 - 4 * 2048**2))


def test_forward_flops_follow_the_2n_rule_plus_causal_attention():
    """Kaplan et al.'s forward cost: 2 x (non-embedding parameters) per token, plus causal
    attention 2 x layers x heads x head_dim x length per token; the scorer's LM head runs only
    at the answer positions."""
    cfg = ModelConfig.from_name("llama3_8b")
    embedding = cfg.vocab_size * cfg.hidden_size * 2  # untied: input embedding and LM head
    non_embedding = cfg.num_parameters() - embedding
    attention = 2 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * 131072
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size
    assert cfg.forward_flops(131072, lm_head_tokens=10) == pytest.approx(
        131072 * (2 * non_embedding + attention) + 10 * lm_head, rel=1e-6)
    assert cfg.forward_flops(4096) == pytest.approx(cfg.flops_per_token(4096) / 3 * 4096)


def _eta_minutes(out: str, marker: str) -> float:
    line = next(line for line in out.splitlines() if marker in line)
    value, unit = line.split()[:2]
    return float(value) * {"s": 1 / 60, "min": 1, "h": 60}[unit]


def test_search_dry_run_eta_in_the_papers_setting(capsys):
    """LLaMA3-8B at 128k on 64 GPUs (the paper's search budget, 1,344 candidates + 4 baselines
    on 10 documents): the ETA is the FLOPs over the stated rate, inversely proportional to the
    MFU and to the GPUs."""
    args = ["pipeline", "--config", str(ROOT / "configs/pipeline/llama3_8b_128k.yaml"), "--dry-run",
            "--nodes", "8", "--gpus-per-node", "8"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "1348 candidates (64 initial + 40 x 32 + 4 baselines) x 10 documents" in out
    cfg = ModelConfig.from_name("llama3_8b")
    expected = 13_500 * cfg.forward_flops(131072, lm_head_tokens=10) / (64 * 989e12 * 0.25) / 60
    at_25 = _eta_minutes(out, "MFU (stated")
    assert at_25 == pytest.approx(expected, abs=0.5)
    assert cli_main([*args, "--mfu", "0.5"]) == 0
    assert _eta_minutes(capsys.readouterr().out, "MFU (stated") == pytest.approx(at_25 / 2, abs=0.5)
    assert cli_main([*args[:-4], "--nodes", "4", "--gpus-per-node", "8"]) == 0
    assert _eta_minutes(capsys.readouterr().out, "MFU (stated") == pytest.approx(at_25 * 2, rel=0.02)


def test_search_dry_run_probe_measures_this_machine(capsys):
    rc = cli_main(["search", "--config", str(ROOT / "configs/search/tiny.yaml"), "--dry-run", "--world-size", "1",
                   "--probe", "--probe-tokens", "256"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(line for line in out.splitlines() if "--probe:" in line)
    assert "float32, one layer at 256 tokens" in line and _eta_minutes(out, "--probe:") > 0


def test_search_dry_run_says_halving_makes_the_count_an_upper_bound(tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text((ROOT / "configs/search/tiny.yaml").read_text() + "halving: {rungs: [1]}\n")
    assert cli_main(["search", "--config", str(config), "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "at most " in out and "successive halving after documents [1] (margin 0.1)" in out
