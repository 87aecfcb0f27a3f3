#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for testing slurm/*.sh for real (tests/test_slurm.py).
#
#   bash scripts/local_slurm.sh start    # install (root, apt) if missing, configure, start, wait idle
#   bash scripts/local_slurm.sh env      # prints `export SLURM_CONF=...` for the client commands
#   bash scripts/local_slurm.sh stop     # stop the daemons this script started
#
# With LONGROPE2_SLURM_NODES=N the nodes are instead the network-namespace nodes of
# scripts/local_cluster.sh (lr2n1..N at 10.77.0.1..N, brought up first): slurmctld on the host at
# the bridge address 10.77.0.254, one slurmd per node started inside it (own address and
# hostname), per-node spool, pid and log files (%n); its own directory and ports, so it can run
# beside the one-node cluster.
#
# Debian's slurm-wlm and munge; munged, slurmctld and slurmd run from $LONGROPE2_SLURM_DIR
# (default /tmp/longrope2-slurm) with their own slurm.conf (SLURM_CONF points at it, /etc/slurm is
# left alone). No cgroups (containers rarely allow them): proctrack/linuxproc, task/none, no
# accounting daemon (so no sacct: poll squeue/scontrol). Exit 3 when it cannot run here (not root
# and Slurm missing, or the daemons do not come up), with the reason on stderr.
set -euo pipefail

NODES=${LONGROPE2_SLURM_NODES:-0}
if [ "$NODES" -gt 0 ]; then
  DIR=${LONGROPE2_SLURM_DIR:-/tmp/longrope2-slurm-$NODES-nodes}
  CTLD_PORT=${LONGROPE2_SLURMCTLD_PORT:-6827}
  SLURMD_PORT=${LONGROPE2_SLURMD_PORT:-6828}
else
  DIR=${LONGROPE2_SLURM_DIR:-/tmp/longrope2-slurm}
  CTLD_PORT=${LONGROPE2_SLURMCTLD_PORT:-6817}
  SLURMD_PORT=${LONGROPE2_SLURMD_PORT:-6818}
fi
CLUSTER="$(dirname "$0")/local_cluster.sh"
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
  local host cpus mem_mb ctld_addr nodes_line partition_nodes spool pidfile logfile
  host=$(hostname -s)
  cpus=$(nproc --all)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/munge"
  if [ "$NODES" -gt 0 ]; then
    ctld_addr=10.77.0.254
    nodes_line="NodeName=lr2n[1-$NODES] NodeAddr=10.77.0.[1-$NODES] CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    partition_nodes="lr2n[1-$NODES]"
    spool="$DIR/d/%n" pidfile="$DIR/slurmd.%n.pid" logfile="$DIR/slurmd.%n.log"
  else
    ctld_addr=127.0.0.1
    nodes_line="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    partition_nodes=$host
    spool="$DIR/d" pidfile="$DIR/slurmd.pid" logfile="$DIR/slurmd.log"
  fi
  cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: ${NODES} namespace node(s) (0: localhost), no cgroups, no accounting
ClusterName=longrope2-local
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$logfile
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
$nodes_line
PartitionName=local Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# slurmd pid files: one, or one per namespace node
slurmd_pidfiles() {
  if [ "$NODES" -gt 0 ]; then
    local i
    for i in $(seq 1 "$NODES"); do echo "$DIR/slurmd.lr2n$i.pid"; done
  else
    echo "$DIR/slurmd.pid"
  fi
}

all_alive() {
  local pidfile
  alive "$DIR/slurmctld.pid" || return 1
  for pidfile in $(slurmd_pidfiles); do alive "$pidfile" || return 1; done
}

start_slurmd() {
  if [ "$NODES" -gt 0 ]; then
    local i
    for i in $(seq 1 "$NODES"); do
      mkdir -p "$DIR/d/lr2n$i"
      bash "$CLUSTER" exec "lr2n$i" slurmd -f "$CONF" -N "lr2n$i" ||
        skip "slurmd on lr2n$i did not start (see $DIR/slurmd.lr2n$i.log)"
    done
  else
    slurmd -f "$CONF" || skip "slurmd did not start (see $DIR/slurmd.log)"
  fi
}

start() {
  install_if_missing
  if [ "$NODES" -gt 0 ] && ! ip netns list 2>/dev/null | grep -q "^lr2n$NODES\b"; then
    skip "namespace node lr2n$NODES is not up (bash scripts/local_cluster.sh up $NODES)"
  fi
  if all_alive; then
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
  start_slurmd
  wait_idle
}

wait_idle() {
  export SLURM_CONF="$CONF"
  local states="" want
  want=$((NODES > 0 ? NODES : 1))
  for _ in $(seq 1 60); do
    states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u || true)
    if [ "$(echo "$states" | grep -cE " (idle|mixed|allocated)$" || true)" -ge "$want" ]; then
      echo "local_slurm: $(echo "$states" | tr '\n' ' ')(SLURM_CONF=$CONF)" >&2
      return 0
    fi
    echo "$states" | awk '$2 ~ /^(down|drain|fail)/ {print $1}' | while read -r node; do
      scontrol update nodename="$node" state=resume 2>/dev/null || true
    done
    sleep 1
  done
  skip "the nodes did not become idle (${states:-no nodes}; see $DIR/slurmctld.log, $DIR/slurmd*.log)"
}

stop() {
  local pidfile
  for pidfile in $(slurmd_pidfiles) "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
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
