#!/usr/bin/env bash
# LongRoPE2 mixed context window mid-training, the paper's setting: LLaMA-3-8B 8k -> 128k on
# 8 nodes x 8 A100/H100-80GB (configs/llama3_8b_128k.yaml: tp=8 + SP, full recompute, dp=8).
#
#   mkdir -p logs && sbatch slurm/midtrain_128k.sh
#   CONFIG=configs/phi3_mini_128k.yaml sbatch slurm/midtrain_128k.sh
#   CONTAINER_IMAGE=/shared/longrope2.sqsh CONTAINER_MOUNTS=/data:/data sbatch slurm/midtrain_128k.sh
#   # the tiny CPU run (what tests/test_slurm.py submits to a local Slurm):
#   CONFIG=configs/tiny.yaml NPROC_PER_NODE=2 DEVICE=cpu \
#     sbatch --nodes 1 --gpus-per-node 0 --time 30 slurm/midtrain_128k.sh
#
# Check the plan first (layout, micro-batches, per-GPU memory; no GPU needed):
#   python launch/train.py --config configs/llama3_8b_128k.yaml --dry-run --nodes 8 --gpus-per-node 8
#
# Preemption and time limits: Slurm sends USR1 to this script 10 minutes before the time limit
# (a 128k step of the paper's run takes ~3 minutes); slurm/torchrun.sh then sends SIGTERM to the
# training step, every rank finishes its step, a checkpoint is saved, and the job requeues itself.
# The requeued (or a resubmitted) job resumes from <output_dir>/checkpoints/latest: the trainer
# does that by itself, no flag needed. Under PreemptMode=REQUEUE Slurm sends the SIGTERM itself.
# Environment overrides (CONFIG, NPROC_PER_NODE, DEVICE, CONTAINER_IMAGE, NCCL_*, ...): see
# slurm/torchrun.sh. Logs: logs/<job name>-<job id>.out (create logs/ before sbatch).
#
#SBATCH --job-name=longrope2-midtrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail
ROOT=${LONGROPE2_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
export CONFIG=${CONFIG:-configs/llama3_8b_128k.yaml}
export ENTRY=launch/train.py
# sbatch runs a copy of this file: the launcher is found through the checkout
exec bash "$ROOT/slurm/torchrun.sh"
