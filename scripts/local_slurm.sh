#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for testing slurm/*.sh for real (tests/test_slurm.py).
#
#   bash scripts/local_slurm.sh start    # install (root, apt) if missing, configure, start, wait idle
#   bash scripts/local_slurm.sh env      # prints `export SLURM_CONF=...` for the client commands
#   bash scripts/local_slurm.sh stop     # stop the daemons this script started
#
# Debian's slurm-wlm and munge; munged, slurmctld and slurmd run from $LONGROPE2_SLURM_DIR
# (default /tmp/longrope2-slurm) with their own slurm.conf (SLURM_CONF points at it, /etc/slurm is
# left alone). No cgroups (containers rarely allow them): proctrack/linuxproc, task/none, no
# accounting daemon (so no sacct: poll squeue/scontrol). Exit 3 when it cannot run here (not root
# and Slurm missing, or the daemons do not come up), with the reason on stderr.
set -euo pipefail

DIR=${LONGROPE2_SLURM_DIR:-/tmp/longrope2-slurm}
CTLD_PORT=${LONGROPE2_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${LONGROPE2_SLURMD_PORT:-6818}
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"

skip() {
  echo "local_slurm: $*" >&2
  exit 3
}

install_if_missing() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || skip "${missing[*]} not installed and not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || skip "${missing[*]} not installed and no apt-get"
  echo "local_slurm: installing ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_conf() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc --all)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/munge"
  cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: one node on localhost, no cgroups, no accounting
ClusterName=longrope2-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
  install_if_missing
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    wait_idle
    return 0
  fi
  write_conf
  export SLURM_CONF="$CONF"
  # munged: as the munge user when there is one (it refuses a key owned by someone else)
  if ! alive "$DIR/munge/munged.pid"; then
    local key=/etc/munge/munge.key
    if [ ! -f "$key" ]; then
      [ "$(id -u)" = 0 ] || skip "no $key"
      mungekey --create --keyfile "$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1 count=1024 2>/dev/null
      chown munge:munge "$key" 2>/dev/null || true
      chmod 600 "$key"
    fi
    local owner
    owner=$(stat -c %U "$key")
    chown "$owner" "$DIR/munge"
    chmod 755 "$DIR/munge"
    local munged_args=(--socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log"
      --seed-file="$DIR/munge/munged.seed" --key-file="$key")
    if [ "$owner" = root ]; then
      munged --force "${munged_args[@]}" || skip "munged did not start (see $DIR/munge/munged.log)"
    else
      runuser -u "$owner" -- munged "${munged_args[@]}" || skip "munged did not start (see $DIR/munge/munged.log)"
    fi
  fi
  slurmctld -f "$CONF" || skip "slurmctld did not start (see $DIR/slurmctld.log)"
  slurmd -f "$CONF" || skip "slurmd did not start (see $DIR/slurmd.log)"
  wait_idle
}

wait_idle() {
  export SLURM_CONF="$CONF"
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %T 2>/dev/null | awk 'NR == 1' || true)  # awk reads all: no SIGPIPE
    case "$state" in
      idle | mixed | allocated) echo "local_slurm: node $state (SLURM_CONF=$CONF)" >&2; return 0 ;;
      down* | drain* | fail*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  skip "the node did not become idle (state: ${state:-none}; see $DIR/slurmctld.log, $DIR/slurmd.log)"
}

stop() {
  local pidfile
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if alive "$pidfile"; then
      kill "$(cat "$pidfile")" || true
    fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
