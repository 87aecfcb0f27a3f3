#!/usr/bin/env bash
# The whole LongRoPE2 method on a Slurm cluster: `longrope2 pipeline` runs in this batch script and
# launches each distributed stage (pretrain, search, train) across the allocation with srun + one
# torchrun per node (slurm/torchrun.sh); the one-process stages (prepare, import, export, eval)
# run here on the first node.
#
#   mkdir -p logs && CONFIG=configs/pipeline/NAME.yaml sbatch --nodes 8 slurm/pipeline.sh
#   CONFIG=configs/pipeline/tiny.yaml NPROC_PER_NODE=2 DEVICE=cpu sbatch --gpus-per-node 0 slurm/pipeline.sh
#
# Plan first: longrope2 pipeline --config $CONFIG --dry-run --nodes 8 --gpus-per-node 8
# Time limit and preemption: USR1 (10 minutes before the limit) or SIGTERM makes the running
# stage's ranks checkpoint and stop; the job then requeues itself and the pipeline resumes where
# it stopped (finished stages are skipped, the trainer resumes from its checkpoint, the search
# with --resume). Environment overrides: see slurm/torchrun.sh.
#
#SBATCH --job-name=longrope2-pipeline
#SBATCH --nodes=1
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
cd "$ROOT"
: "${CONFIG:?set CONFIG (a pipeline YAML, configs/pipeline/)}"
export LONGROPE2_DIR=$ROOT LONGROPE2_PIPELINE_LAUNCH=slurm PYTHONUNBUFFERED=1
if [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
else
  PYTHON=${PYTHON:-python}
fi
export PYTHON
echo "[slurm] pipeline job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_NNODES:-1} node(s), config ${CONFIG}"

requeue=0
# shellcheck disable=SC2317  # run by the traps below
on_usr1() {
  echo "[slurm] USR1 (time limit near): the running stage checkpoints and stops, then the job requeues"
  requeue=1
  scancel --signal=TERM "$SLURM_JOB_ID" || true  # the job steps (a stage's torchrun and ranks), not this shell
}
# shellcheck disable=SC2317
on_term() {
  echo "[slurm] SIGTERM (preempted): the running stage checkpoints and stops"
  scancel --signal=TERM "$SLURM_JOB_ID" || true
}
trap on_usr1 USR1
trap on_term TERM

# in the background so that the traps run while it does
"$PYTHON" -m longrope2.cli pipeline --config "$CONFIG" &
pid=$!
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do  # a trap interrupted `wait`: keep waiting for the stage to save
  rc=0
  wait "$pid" || rc=$?
done

if [ "$requeue" = 1 ]; then
  echo "[slurm] pipeline stopped (rc $rc); requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[slurm] pipeline done (rc $rc)"
exit "$rc"
