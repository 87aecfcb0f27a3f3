#!/usr/bin/env bash
# One node with the Docker image (docker/Dockerfile): mixed context window training (or the
# search) on all local GPUs, the checkout mounted over the image's copy so that its code, configs
# and outputs are used.
#
#   docker build -f docker/Dockerfile -t longrope2 .
#   CONFIG=configs/smollm2_135m_32k.yaml bash docker/run_single_node.sh
#   ENTRY=launch/search.py CONFIG=configs/search/smollm2_32k_gpu.yaml bash docker/run_single_node.sh
#   bash docker/run_single_node.sh --dry-run --nodes 1 --gpus-per-node 8   # extra args go to ENTRY
#
# Environment: IMAGE (default longrope2), CONFIG, ENTRY (launch/train.py), NPROC_PER_NODE (8),
# DATA_DIR (mounted at the same path, read-only), DOCKER (docker or podman).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-longrope2}
CONFIG=${CONFIG:-configs/smollm2_135m_32k.yaml}
ENTRY=${ENTRY:-launch/train.py}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
DOCKER=${DOCKER:-docker}

args=(run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
  --user "$(id -u):$(id -g)" -v "$ROOT:/opt/longrope2" -w /opt/longrope2
  -e NCCL_DEBUG="${NCCL_DEBUG:-WARN}" -e TORCH_NCCL_ASYNC_ERROR_HANDLING=1 -e CUDA_DEVICE_MAX_CONNECTIONS=1)
if [ -n "${DATA_DIR:-}" ]; then
  args+=(-v "$DATA_DIR:$DATA_DIR:ro")
fi
if [ -t 1 ]; then
  args+=(-it)
fi
launcher=(torchrun --standalone --nproc-per-node="$NPROC_PER_NODE")
case " $* " in
  *" --dry-run "*) launcher=(python) ;;  # the plan only: one process, no GPU work
esac
exec "$DOCKER" "${args[@]}" "$IMAGE" "${launcher[@]}" "$ENTRY" --config "$CONFIG" "$@"
