#!/usr/bin/env bash
# Several "nodes" on one machine for multi-node tests: each node is a network namespace with its
# own address on a private bridge (10.77.0.0/24, the host is .254) and, for commands run through
# `exec`, its own hostname (a UTS namespace). The filesystem is shared, as on a cluster with a
# shared home. Root only.
#
#   bash scripts/local_cluster.sh up 2          # nodes lr2n1 (10.77.0.1) and lr2n2 (10.77.0.2)
#   bash scripts/local_cluster.sh exec lr2n1 hostname -I
#   bash scripts/local_cluster.sh kill lr2n2    # SIGKILL every process on node 2 (a node dying)
#   bash scripts/local_cluster.sh cut lr2n2     # take node 2's link down (a network failure)
#   bash scripts/local_cluster.sh heal lr2n2
#   bash scripts/local_cluster.sh down          # remove the namespaces, the bridge, the hosts lines
#
# `exec` uses `nsenter --net` rather than `ip netns exec`: the latter remounts /sys, which hides
# /sys/fs/cgroup from what runs inside (slurmd then fails to start).
set -euo pipefail

BRIDGE=${LOCAL_CLUSTER_BRIDGE:-lr2br0}
SUBNET=${LOCAL_CLUSTER_SUBNET:-10.77.0}
PREFIX=${LOCAL_CLUSTER_PREFIX:-lr2n}
MARK="# longrope2-local-cluster"

usage() {
  echo "usage: $0 up N | down | exec NODE CMD... | kill NODE | cut NODE | heal NODE | nodes" >&2
  exit 2
}

nodes() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V || true
}

up() {
  local count=$1
  if ! [[ $count =~ ^[0-9]+$ ]] || [ "$count" -lt 1 ] || [ "$count" -gt 250 ]; then usage; fi
  down >/dev/null 2>&1 || true
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i node
  for i in $(seq 1 "$count"); do
    node="$PREFIX$i"
    ip netns add "$node"
    ip link add "v$node" type veth peer name eth0 netns "$node"
    ip link set "v$node" master "$BRIDGE" up
    ip -n "$node" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    echo "$SUBNET.$i $node $MARK" >>/etc/hosts
  done
  echo "$count nodes: $(nodes | tr '\n' ' ')(bridge $BRIDGE, $SUBNET.0/24)"
}

down() {
  local node
  for node in $(nodes); do
    ip netns pids "$node" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip link del "v$node" 2>/dev/null || true
    ip netns del "$node"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if grep -q "$MARK" /etc/hosts; then
    # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace it
    grep -v "$MARK" /etc/hosts >/etc/hosts.local-cluster || true
    cat /etc/hosts.local-cluster >/etc/hosts
    rm -f /etc/hosts.local-cluster
  fi
}

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
  up) [ $# -eq 1 ] || usage; up "$1" ;;
  down) down ;;
  nodes) nodes ;;
  exec)
    [ $# -ge 2 ] || usage
    node=$1
    shift
    # the inner shell names the node ($0) and then becomes the command ($@)
    # shellcheck disable=SC2016
    exec nsenter --net="/var/run/netns/$node" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$node" "$@"
    ;;
  kill) [ $# -eq 1 ] || usage; ip netns pids "$1" | xargs -r kill -9 ;;
  cut) [ $# -eq 1 ] || usage; ip link set "v$1" down ;;
  heal) [ $# -eq 1 ] || usage; ip link set "v$1" up ;;
  *) usage ;;
esac
