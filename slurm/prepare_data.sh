#!/usr/bin/env bash
# `longrope2 prepare-data --config MIX.yaml` as a Slurm array: task I of N tokenizes the shards
# k with k % N == I using every CPU of its node; whoever finishes the last shard merges the
# buckets and writes the manifest (the merge is idempotent). CPU only, no GPUs.
#
#   mkdir -p logs && CONFIG=configs/data/longrope2_mix.yaml sbatch --array=0-7 slurm/prepare_data.sh
#
# A killed or requeued task skips the shards it (or anyone) already finished. The array size is
# the number of shares: every task of one array must see the same --array range.
#
#SBATCH --job-name=longrope2-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
ROOT=${LONGROPE2_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
CONFIG=${CONFIG:-configs/data/longrope2_mix.yaml}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
TASK=${SLURM_ARRAY_TASK_ID:-0}
TASKS=${SLURM_ARRAY_TASK_COUNT:-1}
if [ -x .venv/bin/longrope2 ]; then PATH="$ROOT/.venv/bin:$PATH"; fi
echo "[prepare_data] $(hostname): shard share $TASK of $TASKS, $WORKERS workers, $CONFIG"
exec longrope2 prepare-data --config "$CONFIG" --workers "$WORKERS" --shard-index "$TASK" --num-shards "$TASKS"
