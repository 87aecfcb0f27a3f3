#!/usr/bin/env bash
# The launcher behind slurm/midtrain_128k.sh and slurm/search.sh (run inside a Slurm allocation,
# not submitted by itself): one torchrun per node through srun, c10d rendezvous on the first
# node, NCCL/InfiniBand settings, an optional container (pyxis/enroot, apptainer or podman), and
# the USR1/TERM traps that make the ranks checkpoint and the job requeue itself.
#
# Environment (all optional unless marked):
#   ENTRY             (required) launch/train.py or launch/search.py
#   CONFIG            (required) the run or search YAML
#   NPROC_PER_NODE    ranks per node (default: the node's GPUs, else 8)
#   DEVICE            gpu (NCCL) or cpu (gloo; CUDA hidden, OMP_NUM_THREADS=1)
#   MASTER_PORT       rendezvous port on the first node (default: 20000-29999 from the job id
#                     and restart count, so a requeued run never meets the last run's store)
#   CONTAINER_IMAGE   the image of docker/Dockerfile; unset = bare metal
#   CONTAINER_RUNTIME pyxis (default: srun --container-image, an .sqsh or docker:// image),
#                     apptainer or singularity (exec of a .sif), podman (run of an image name;
#                     PODMAN=docker/podman.sh where plain podman fails as on the CI machines)
#   CONTAINER_MOUNTS  extra mounts (src:dst[,src:dst]); the checkout is mounted at /opt/longrope2
#   LONGROPE2_DIR     the checkout (default: the submit directory)
#   PYTHON            interpreter (default: .venv/bin/python when bare and present, else python)
#   EXTRA_ARGS        more arguments for the entry script (split on spaces)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_DEBUG, ...: override the defaults
set -euo pipefail

: "${ENTRY:?set ENTRY (launch/train.py or launch/search.py)}"
: "${CONFIG:?set CONFIG (a YAML file)}"
: "${SLURM_JOB_ID:?run inside a Slurm allocation (sbatch slurm/midtrain_128k.sh)}"
ROOT=${LONGROPE2_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
DEVICE=${DEVICE:-gpu}
CONTAINER_RUNTIME=${CONTAINER_RUNTIME:-pyxis}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RESTART=${SLURM_RESTART_COUNT:-0}
# A requeued run often lands on the same first node while the last run's processes drain; a fresh
# port and rendezvous id keep its agents from joining (or being refused by) the old c10d store.
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID % 1000) * 10 + RESTART % 10))}
# the whole list is read (no `| head -n 1`: under pipefail scontrol can die of SIGPIPE, exit 141)
mapfile -t job_hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${job_hosts[0]:?scontrol show hostnames gave no host for $SLURM_JOB_NODELIST}
NNODES=${SLURM_NNODES:-1}
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  # NCCL over InfiniBand; every value can be overridden from the environment
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
  export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  # megatron: one CUDA connection keeps TP/SP communication ordered with compute
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
fi
export PYTHONUNBUFFERED=1
# torchrun waits this long for the ranks to save after SIGTERM before it kills them
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}

srun_args=(--nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1)
container=()  # what runs the command inside the image on each node (empty: pyxis, or bare metal)
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  # the checkout over the image's copy (its editable install): the checkout's code, configs, outputs
  mounts="$ROOT:/opt/longrope2${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
  case "$CONTAINER_RUNTIME" in
    pyxis)
      srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir=/opt/longrope2) ;;
    apptainer|singularity)
      # the environment passes through as it is (apptainer's default); --nv maps the node's GPUs in
      container=("${APPTAINER:-$CONTAINER_RUNTIME}" exec --bind "$mounts" --pwd /opt/longrope2)
      if [ "$DEVICE" = gpu ]; then container+=(--nv); fi
      container+=("$CONTAINER_IMAGE") ;;
    podman)
      # host network, hostname and IPC: the c10d store and NCCL/gloo see the node itself; SIGTERM
      # reaches torchrun through podman's signal proxy
      container=("${PODMAN:-podman}" run --rm --network host --uts host --ipc host -w /opt/longrope2)
      IFS=, read -r -a pairs <<< "$mounts"
      for pair in "${pairs[@]}"; do container+=(-v "$pair"); done
      # the launcher's settings by name (values from each node's environment); not PATH, HOME or
      # LONGROPE2_*, which would point at the host's files
      while IFS= read -r name; do container+=(-e "$name"); done \
        < <(compgen -e | grep -E '^(NCCL_|TORCH_|CUDA_|GLOO_|SLURM_|OMP_NUM_THREADS$|PYTHONUNBUFFERED$)' || true)
      if [ "$DEVICE" = gpu ]; then container+=(--device nvidia.com/gpu=all); fi  # CDI (nvidia-ctk)
      container+=("$CONTAINER_IMAGE") ;;
    *)
      echo "error: CONTAINER_RUNTIME=$CONTAINER_RUNTIME: expected pyxis, apptainer, singularity or podman" >&2
      exit 2 ;;
  esac
  PYTHON=${PYTHON:-python}
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
else
  PYTHON=${PYTHON:-python}
fi

# shellcheck disable=SC2206  # EXTRA_ARGS: words on purpose
extra=(${EXTRA_ARGS:-})
echo "[slurm] job ${SLURM_JOB_ID} (restart ${RESTART}) on ${NNODES} node(s) x ${NPROC_PER_NODE} ranks," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${DEVICE}, config ${CONFIG}${CONTAINER_IMAGE:+, $CONTAINER_RUNTIME image $CONTAINER_IMAGE}"

requeue=0
# shellcheck disable=SC2317  # run by the traps below
on_usr1() {
  echo "[slurm] USR1 (time limit near): asking the ranks to checkpoint and stop, then requeueing"
  requeue=1
  scancel --signal=TERM "$SLURM_JOB_ID" || true  # the job steps (torchrun and its ranks), not this shell
}
# shellcheck disable=SC2317
on_term() {
  echo "[slurm] SIGTERM (preempted): the ranks checkpoint and stop"
  scancel --signal=TERM "$SLURM_JOB_ID" || true
}
trap on_usr1 USR1
trap on_term TERM

# in the background so that the traps run while it does
srun "${srun_args[@]}" "${container[@]}" "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-id="$SLURM_JOB_ID.$RESTART" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  "$ENTRY" --config "$CONFIG" "${extra[@]}" &
pid=$!
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do  # a trap interrupted `wait`: keep waiting for the save
  rc=0
  wait "$pid" || rc=$?
done

if [ "$requeue" = 1 ]; then
  echo "[slurm] step ended (rc $rc); requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[slurm] done (rc $rc)"
exit "$rc"
