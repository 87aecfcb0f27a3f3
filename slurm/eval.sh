#!/usr/bin/env bash
# `longrope2 eval` on a Slurm cluster: one model replica per GPU, each rank evaluating a disjoint
# share of the cells still to do (every world-th, so a rerun resumes); rank 0 merges the rank
# files into results.jsonl and writes the report (default: 1 node x 8 GPUs, configs/eval/smollm2_ruler_4k.yaml).
#
#   mkdir -p logs && CONFIG=configs/eval/my_ruler_128k.yaml sbatch --nodes 4 slurm/eval.sh
#   CONFIG=configs/eval/smollm2_ruler_4k.yaml NPROC_PER_NODE=2 DEVICE=cpu \
#     sbatch --gpus-per-node 0 --time 120 slurm/eval.sh
#
# Preemption or a time limit: every sample is on disk as soon as it is computed, so a requeued job
# (or a rerun with another node count) re-evaluates nothing that any earlier run finished.
# Environment overrides: see slurm/torchrun.sh.
#
#SBATCH --job-name=longrope2-eval
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
export CONFIG=${CONFIG:-configs/eval/smollm2_ruler_4k.yaml}
export ENTRY=launch/eval.py
exec bash "$ROOT/slurm/torchrun.sh"
