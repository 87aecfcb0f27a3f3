#!/usr/bin/env bash
# Build the CPU image of docker/Dockerfile with podman, from nothing but the Debian and PyPI
# registries (no registry serves base images here): debootstrap a Debian bookworm + Python 3.11
# rootfs, `podman import` it as the base, build the project's Dockerfile on it with the pinned CPU
# torch. With --smoke, then run inside the image, without network and as an unprivileged user:
# `longrope2 inspect`, the tiny training under torchrun (2 ranks) and the tiny search.
#
#   bash docker/build_local.sh            # the base once (kept), then the image (layers cached)
#   bash docker/build_local.sh --smoke    # ... and the runs inside it
#
# Environment: IMAGE (longrope2:cpu), BASE (longrope2-base:bookworm; REBUILD_BASE=1 remakes it),
# PODMAN (docker/podman.sh as root, else podman), DEBIAN_MIRROR (the host's apt mirror, else
# deb.debian.org), TORCH_PIN (torch==2.13.0), SMOKE_DIR (where the smoke runs write;
# runs/image-smoke).
# The host's pip configuration, its certificate and find-links folders, and its apt Acquire
# settings are mounted into the build read-only, never copied into a layer.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-longrope2:cpu}
BASE=${BASE:-longrope2-base:bookworm}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
if [ "$(id -u)" = 0 ]; then PODMAN=${PODMAN:-$ROOT/docker/podman.sh}; else PODMAN=${PODMAN:-podman}; fi
smoke=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    *) echo "usage: bash docker/build_local.sh [--smoke]" >&2; exit 2 ;;
  esac
done
say() { echo "[image] $*"; }
need() { command -v "$1" >/dev/null || { echo "error: $1 not found ($2)" >&2; exit 1; }; }
need podman "apt-get install podman runc"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/longrope2-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- the base: Debian bookworm + Python 3.11 -------------------------------------------------
if [ "${REBUILD_BASE:-0}" = 1 ] || ! "$PODMAN" image exists "$BASE"; then
  need debootstrap "apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root to make the base $BASE" >&2; exit 1; }
  mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | sed -n 1p || true)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  say "debootstrap bookworm from $mirror"
  start=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
    bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }
  tar -C "$work/rootfs" -c . | "$PODMAN" import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null
  rm -rf "$work/rootfs"
  say "base $BASE made in $((SECONDS - start)) s"
else
  say "base $BASE exists (REBUILD_BASE=1 remakes it)"
fi

# --- the host's registry settings, for the build only -----------------------------------------
mounts=(-v "$work/pip.conf:/etc/pip.conf:ro")
# the host's pip settings (files and PIP_* variables) in one file; the files it names are mounted too
while read -r path; do  # host path:path in the build
  mounts+=(-v "$path:ro")
done < <(python3 - "$work/pip.conf" <<'PY'
import configparser, os, sys
conf = configparser.ConfigParser()
for path in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")):
    conf.read(path)
if not conf.has_section("global"):
    conf.add_section("global")
for env, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                 ("PIP_FIND_LINKS", "find-links"), ("PIP_CERT", "cert"), ("PIP_DEFAULT_TIMEOUT", "timeout")):
    if os.environ.get(env):
        conf.set("global", key, os.environ[env])
with open(sys.argv[1], "w") as f:
    conf.write(f)
for section in conf.sections():
    for key in ("cert", "find-links", "constraint"):
        for value in conf.get(section, key, fallback="").split():
            if os.path.exists(value):
                print(f"{os.path.realpath(value)}:{value}")
PY
)
if command -v apt-config >/dev/null; then
  # e.g. Acquire::Check-Valid-Until "false" for a snapshot mirror: the build's apt needs the same
  apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|http::Proxy|https::Proxy) ' > "$work/apt.conf" || true
  mounts+=(-v "$work/apt.conf:/etc/apt/apt.conf.d/99build-host:ro")
fi

# --- the image ----------------------------------------------------------------------------------
say "podman build $IMAGE (base $BASE, $TORCH_PIN)"
start=$SECONDS
"$PODMAN" build --isolation chroot --network host --layers "${mounts[@]}" \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_PIN="$TORCH_PIN" \
  -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$ROOT" > "$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; echo "error: podman build failed (log above)" >&2; exit 1; }
say "image $IMAGE built in $((SECONDS - start)) s ($("$PODMAN" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
[ "$smoke" = 1 ] || exit 0

# --- inside it: no network, an unprivileged user, outputs in a mounted folder -------------------
out=${SMOKE_DIR:-$ROOT/runs/image-smoke}
rm -rf "$out/runs/tiny" "$out/search"  # a rerun starts over instead of resuming the last smoke run
mkdir -p "$out"
chmod 777 "$out"
run=("$PODMAN" run --rm --network none --user 1000:1000 -v "$out:/out" -w /out -e OMP_NUM_THREADS=1 "$IMAGE")
say "inside: longrope2 inspect"
"${run[@]}" longrope2 inspect smollm2_135m --target-length 32768 | tee "$out/inspect.txt"
say "inside: tiny training, torchrun 2 ranks"
"${run[@]}" torchrun --standalone --nproc-per-node 2 /opt/longrope2/launch/train.py \
  --config /opt/longrope2/configs/tiny.yaml 2>&1 | tee "$out/train.log"
say "inside: tiny search, torchrun 2 ranks"
"${run[@]}" torchrun --standalone --nproc-per-node 2 /opt/longrope2/launch/search.py \
  --config /opt/longrope2/configs/search/tiny.yaml --output-dir /out/search 2>&1 | tee "$out/search.log"
say "smoke runs passed; outputs in $out"
