#!/usr/bin/env bash
# The needle-driven LongRoPE2 factor search on a Slurm cluster: every data-parallel group of the
# config's TP x PP x CP layout is a worker pulling candidates (default: 1 node x 8 GPUs,
# configs/search/smollm2_32k_gpu.yaml).
#
#   mkdir -p logs && CONFIG=configs/search/smollm2_32k_gpu.yaml sbatch slurm/search.sh
#   CONFIG=configs/search/tiny.yaml NPROC_PER_NODE=2 DEVICE=cpu \
#     sbatch --gpus-per-node 0 --time 30 slurm/search.sh
#
# Plan first: python launch/search.py --config $CONFIG --dry-run --nodes 1 --gpus-per-node 8
# Preemption: the search keeps every score as it is computed and its state after every
# generation; a requeued job (SLURM_RESTART_COUNT > 0) continues with --resume and re-scores
# nothing (stopped inside the first generation, it restarts that generation from the logged scores).
# Environment overrides: see slurm/torchrun.sh.
#
#SBATCH --job-name=longrope2-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
ROOT=${LONGROPE2_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
export CONFIG=${CONFIG:-configs/search/smollm2_32k_gpu.yaml}
export ENTRY=launch/search.py
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  export EXTRA_ARGS="--resume ${EXTRA_ARGS:-}"
fi
exec bash "$ROOT/slurm/torchrun.sh"
