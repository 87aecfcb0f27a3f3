"""HF <-> megatron distributed checkpoint conversion, against transformers.

Tiny models are built with transformers' own config classes and saved with ``save_pretrained``
(sharded, so the index is read too): a LLaMA-3-like one (GQA, untied, base 5e5) and a Phi-3-like
one (fused qkv / gate_up, partial rotary 0.75). One process: HF -> dist checkpoint -> HF is
bit-exact, an exported ``longrope`` model loads with ``AutoModelForCausalLM`` and gives our
logits below and above the original window, errors name what is wrong. Two processes
(tests/distributed/convert_worker.py): import at TP=2, loads at TP=2 and PP=2 give transformers'
logits, and exports at TP=2 and PP=2 equal the TP=1 export file for file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from factories import ramp_longrope2_scaling
from longrope2.model.config import ModelConfig
from torchrun import run_torchrun

ORIGINAL, TARGET = 64, 256
WORKER = str(Path(__file__).parent / "distributed" / "convert_worker.py")
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
              vocab_size=256, max_position_embeddings=ORIGINAL, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, initializer_range=0.1)  # logits of order 1


def _llama3():
    return LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=500000.0, rms_norm_eps=1e-5))


def _phi3():
    return Phi3ForCausalLM(Phi3Config(**COMMON, partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL))


MAKERS = {"llama3": _llama3, "phi3": _phi3}


def save_tiny(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = MAKERS[name]()
    with torch.no_grad():  # random norms too, so a swapped norm cannot hide
        for key, p in model.named_parameters():
            if "norm" in key:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size="60KB")  # several files + an index
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # carried through to the export
    return folder


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def single_process():
    from longrope2.parallel import ParallelDims, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelDims(tp=1, pp=1, cp=1, world_size=1), seed=1234)
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def imported(single_process, tmp_path_factory):
    """Per model: the saved HF folder, its TP=1 import, and that import exported at TP=1."""
    from longrope2.model.convert import export_hf, import_hf

    work = tmp_path_factory.mktemp("convert")
    out = {}
    for name in MAKERS:
        m = work / name
        hf = save_tiny(name, m / "hf")
        cfg = import_hf(hf, m / "ck_tp1", progress=False)
        export_hf(m / "ck_tp1", m / "out_tp1", cfg, progress=False)
        out[name] = (m, cfg)
    return work, out


@pytest.mark.parametrize("name", list(MAKERS))
def test_round_trip_is_bit_exact(imported, name):
    """HF -> megatron dist checkpoint -> HF: the same key set, every tensor torch.equal, the
    config's architecture unchanged, tokenizer files carried along."""
    _, models = imported
    m, cfg = models[name]
    assert len(list((m / "hf").glob("*.safetensors"))) > 1  # the source was sharded with an index
    assert_same_tensors(hf_tensors(m / "hf"), hf_tensors(m / "out_tp1"))
    source, exported = (json.loads((m / d / "config.json").read_text()) for d in ("hf", "out_tp1"))
    for key in ("architectures", "num_hidden_layers", "num_key_value_heads", "rope_parameters",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert exported[key] == source[key], key
    assert (m / "out_tp1" / "tokenizer_config.json").read_text() == (m / "hf" / "tokenizer_config.json").read_text()
    assert (m / "out_tp1" / "generation_config.json").is_file()
    if name == "phi3":
        assert cfg.rotary_percent == 0.75 and cfg.rotary_dim == 12
        assert "model.layers.0.self_attn.qkv_proj.weight" in hf_tensors(m / "out_tp1")


@pytest.mark.parametrize("name", list(MAKERS))
def test_exported_longrope_model_matches_ours_in_transformers(imported, tmp_path, name):
    """Export with LongRoPE2 factors; stock transformers loads the folder (AutoModelForCausalLM)
    and gives our megatron model's logits below and above the original window."""
    from megatron.core import dist_checkpointing

    from longrope2.model.convert import export_hf
    from longrope2.model.gpt import build_gpt_model

    _, models = imported
    m, cfg = models[name]
    scaling = ramp_longrope2_scaling(cfg, ORIGINAL, TARGET)
    out = export_hf(m / "ck_tp1", tmp_path / "out", cfg, scaling, max_shard_size="5GB", progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    assert config["max_position_embeddings"] == TARGET and rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == ORIGINAL == config["original_max_position_embeddings"]
    assert rope["long_factor"] == list(scaling.long_factor) and len(rope["short_factor"]) == cfg.rotary_dim // 2
    assert rope["attention_factor"] == scaling.resolved_attention_factor  # written out, not left to the reader

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "longrope"
    ours = build_gpt_model(cfg, rope_scaling=scaling, initialize=False).eval()
    ours.load_state_dict(dist_checkpointing.load({"model": ours.sharded_state_dict()}, str(m / "ck_tp1"))["model"])
    for length in (ORIGINAL // 2, ORIGINAL, ORIGINAL + 8, TARGET):
        tokens = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            a = ours(tokens, torch.arange(length).expand(2, -1), attention_mask=None)
            b = hf(tokens).logits
        assert ours.rotary_pos_emb.uses_long_factors(length) == (length > ORIGINAL)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda msg: f"{name} length {length}: {msg}")


def test_rope_from_best_json_and_legacy_style(imported, tmp_path):
    """``--rope best.json`` (the search's output, which carries target_length) and the legacy
    ``rope_scaling`` style that transformers 4.x and vLLM read."""
    from longrope2.model.convert import export_hf, export_hf_config, resolve_rope

    _, models = imported
    m, cfg = models["llama3"]
    scaling = ramp_longrope2_scaling(cfg, ORIGINAL, TARGET)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"target_length": TARGET, "long_factor": list(scaling.long_factor), "critical_dim": 4}))
    again = resolve_rope(str(best), cfg)
    assert again.long_factor == scaling.long_factor and again.max_position_embeddings == TARGET
    legacy = export_hf_config(cfg, None, again, torch.bfloat16, "rope_scaling")
    assert legacy["rope_scaling"]["type"] == "longrope" and legacy["rope_theta"] == cfg.rope_theta
    assert legacy["dtype"] == "bfloat16" and "rope_parameters" not in legacy
    out = export_hf(m / "ck_tp1", tmp_path / "legacy", cfg, again, style="rope_scaling", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.rope_parameters["rope_type"] == "longrope"


def test_export_from_a_training_output_dir(imported, tmp_path):
    """A trainer's ``output_dir`` (``checkpoints/latest`` -> ``iter_N``, optimizer and step next
    to the model) exports like the checkpoint it names."""
    from megatron.core import dist_checkpointing

    from longrope2.model.convert import export_hf
    from longrope2.model.gpt import build_gpt_model

    _, models = imported
    m, cfg = models["llama3"]
    model = build_gpt_model(cfg, initialize=False)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(m / "ck_tp1"))["model"])
    step = tmp_path / "run" / "checkpoints" / "iter_0000003"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "step": 3}, str(step))
    (step.parent / "latest").write_text("iter_0000003\n")
    export_hf(tmp_path / "run", tmp_path / "out", cfg, hf_meta=m / "hf", progress=False)
    assert_same_tensors(hf_tensors(m / "hf"), hf_tensors(tmp_path / "out"))


def test_clear_errors(imported, tmp_path):
    from longrope2.model.convert import export_hf, import_hf, resolve_rope

    work, models = imported
    m, cfg = models["llama3"]
    with pytest.raises(FileNotFoundError, match="no HF checkpoint at"):
        import_hf(tmp_path / "nothing", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        import_hf(tmp_path / "empty", tmp_path / "a")
    with pytest.raises(FileExistsError, match="not empty"):
        import_hf(m / "hf", m / "ck_tp1")
    # architecture mismatch: the tiny preset (512 vocab, base 1e4) is not this model
    with pytest.raises(ValueError, match=r"architecture mismatch .*vocab_size 512 vs 256.*rope_theta"):
        import_hf(m / "hf", tmp_path / "a", model=ModelConfig.from_name("tiny"))
    # a shape mismatch names the key
    bad = tmp_path / "bad"
    shutil.copytree(m / "hf", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    file = bad / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.weight has shape \(16, 64\), .* \(32, 64\)"):
        import_hf(bad, tmp_path / "a")
    # biases are another architecture
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": 1}, attention_bias=True)).save_pretrained(tmp_path / "bias")
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        import_hf(tmp_path / "bias", tmp_path / "a")
    # export: the checkpoint does not fit the model config
    with pytest.raises(ValueError, match=r"word_embeddings.weight has global shape \(256, 64\), the model config says \(512, 64\)"):
        export_hf(m / "ck_tp1", tmp_path / "b", dataclasses.replace(cfg, vocab_size=512), progress=False)
    with pytest.raises(FileNotFoundError, match="not a megatron distributed checkpoint"):
        export_hf(m / "hf", tmp_path / "b", cfg)
    # factor count
    (tmp_path / "few.json").write_text(json.dumps({"target_length": TARGET, "long_factor": [4.0] * 5}))
    with pytest.raises(ValueError, match="has 5 long factors, the model needs rotary_dim/2 = 8"):
        resolve_rope(str(tmp_path / "few.json"), cfg)
    (tmp_path / "no_target.json").write_text(json.dumps([4.0] * 8))
    with pytest.raises(ValueError, match="does not say the target length"):
        resolve_rope(str(tmp_path / "no_target.json"), cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_tp2_pp2_loads_match_transformers_and_exports_equal_tp1(imported):
    """Under torchrun (2 gloo ranks): CLI import at TP=2, a TP=1 import loaded at TP=2 and a
    TP=2 import loaded at PP=2 give transformers' longrope logits (both regimes), and the
    TP=2 / PP=2 exports are bit-equal to the TP=1 export (layout independence)."""
    work, models = imported
    start = time.perf_counter()
    proc = run_torchrun(2, WORKER, "--work", str(work), timeout=400)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"torchrun conversion checks: {elapsed:.1f} s")
    for name, (m, _) in models.items():
        for r in ranks:
            assert all(r[f"{name}.{c}"]["ok"] for c in ("import_tp2", "logits_tp2", "logits_pp2", "export_tp2", "export_pp2"))
        tp2 = ranks[0][f"{name}.logits_tp2"]["result"]
        pp2 = ranks[1][f"{name}.logits_pp2"]["result"]  # the last stage is rank 1
        assert ranks[0][f"{name}.logits_pp2"]["result"] == {}  # the first stage has no logits
        for result in (tp2, ranks[1][f"{name}.logits_tp2"]["result"], pp2):
            assert [v["long_factors"] for v in result.values()] == [False, True]
            for length, v in result.items():
                print(f"{name} {length}: max |ours - HF| = {v['max_abs']:.2e} (logits up to {v['scale']:.2f})")
                assert v["max_abs"] < 1e-4, (name, length, v)
        reference = hf_tensors(m / "out_tp1")
        assert len(list((m / "out_tp2").glob("*.safetensors"))) > 1
        assert (m / "out_tp2" / "model.safetensors.index.json").is_file()
        assert_same_tensors(reference, hf_tensors(m / "out_tp2"))
        assert_same_tensors(reference, hf_tensors(m / "out_pp2"))
        assert_same_tensors(hf_tensors(m / "hf"), hf_tensors(m / "out_tp2"))
        assert json.loads((m / "out_tp2" / "config.json").read_text()) == json.loads(
            (m / "out_tp1" / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_round_trip_is_bit_exact(single_process, tmp_path):
    """SmolLM2-135M (the GGUF, de-quantized by transformers) -> dist checkpoint -> HF folder:
    every tensor equal, tied embeddings (no lm_head), tokenizer saved; transformers loads it."""
    from longrope2.model.convert import export_hf, import_hf
    from longrope2.model.pretrained import load_hf_causal_lm

    start = time.perf_counter()
    cfg = import_hf("smollm2", tmp_path / "ck", progress=False)
    imported_s = time.perf_counter() - start
    export_hf(tmp_path / "ck", tmp_path / "out", cfg, max_shard_size="200MB", progress=False)
    total = time.perf_counter() - start
    print(f"SmolLM2-135M import {imported_s:.1f} s, import + export {total:.1f} s")
    hf, _ = load_hf_causal_lm("smollm2")
    source = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    exported = hf_tensors(tmp_path / "out")
    assert_same_tensors(source, exported)
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "tokenizer_config.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, hf(tokens).logits)
