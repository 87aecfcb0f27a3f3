#!/usr/bin/env bash
# The miniature LongRoPE2 replication (configs/pipeline/mini_replication.yaml) on 2 CPU cores:
# tokenizer and data from the embedded books, a small LLaMA pre-trained from scratch at a 256-token
# window, the needle-driven search for 2,048 tokens, three mid-training arms x two seeds at an
# equal token budget, export, evaluation on the held-out book; then the report and the verdicts on
# the paper's two claims in results/mini_replication/ (REPORT.md, replication.png, verdicts.json).
#
#   bash scripts/replicate_mini.sh            # a rerun resumes (finished stages are skipped)
#   RUN_DIR=runs/x RESULTS_DIR=results/x bash scripts/replicate_mini.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"   # megatron's missing-GPU-extras warnings
CONFIG=${CONFIG:-configs/pipeline/mini_replication.yaml}
RUN_DIR=${RUN_DIR:-runs/mini_replication}
RESULTS_DIR=${RESULTS_DIR:-results/mini_replication}

start=$(date +%s)
config=$CONFIG
if [ "$RUN_DIR" != runs/mini_replication ]; then   # the same pipeline into another folder
  mkdir -p "$RUN_DIR"
  config="$RUN_DIR/pipeline.yaml"
  sed "s#^output_dir: .*#output_dir: $RUN_DIR#" "$CONFIG" >"$config"
fi
longrope2 pipeline --config "$config" --dry-run >/dev/null   # a bad config fails here, in seconds
longrope2 pipeline --config "$config"
end=$(date +%s)
REPLICATION_SECONDS=$((end - start)) python scripts/replicate_mini_report.py "$RUN_DIR" "$RESULTS_DIR" >/dev/null
echo "replication finished in $(((end - start) / 60)) min $(((end - start) % 60)) s; report: $RESULTS_DIR/REPORT.md"
python - "$RESULTS_DIR/verdicts.json" <<'PY'
import json, sys
for claim, verdict in json.load(open(sys.argv[1])).items():
    print(f"  {claim}: {verdict}")
PY
