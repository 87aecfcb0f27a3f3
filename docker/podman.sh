#!/usr/bin/env bash
# podman as it runs on this project's CI machines: runc (the default crun fails on hybrid
# cgroups), docker/containers.conf (cgroupfs, no default ulimits) and the host's ulimits for
# `run`. Use it where plain podman fails the same way (PODMAN=docker/podman.sh in
# docker/build_local.sh and slurm/torchrun.sh); elsewhere plain podman is the one to use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
if [ "${1:-}" = run ]; then
  shift
  exec podman --runtime "${PODMAN_RUNTIME:-runc}" run --ulimit host "$@"
fi
exec podman --runtime "${PODMAN_RUNTIME:-runc}" "$@"
