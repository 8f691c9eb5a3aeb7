#!/usr/bin/env bash
# Network-namespace plumbing for a multi-node Slurm cluster on one machine.
#
# Sourced by slurm/local-cluster (functions netns_*), and also a small command line for
# tests and benchmarks that need to act on one node (run `slurm/lib/netns.sh help`).
#
# Layout (each part was needed on Debian 12 with Slurm 22.05; see the notes on each line):
#   - one bridge in the root namespace holding the controller's address (.1 of the slot),
#   - per node a network namespace with a veth into that bridge, named eth0 inside, its
#     own address (.11, .12, ... of the slot) and loopback; no default route, so nothing
#     leaves the namespaces,
#   - a private hosts file (localhost, the controller, every node) that is bind-mounted
#     over /etc/hosts in each node's own mount namespace: a node's hostname must resolve
#     to its bridge address inside the namespaces, or gloo falls back to 127.0.0.1.
# Addresses: 10.231.0.0/24 is cut into 8 slots of /27; a cluster takes the first slot
# whose bridge address no interface holds (slot 0: bridge 10.231.0.1, nodes .11, .12), so
# two clusters with different state folders can coexist.
# Names derive from a 5-hex tag of the state folder's path: namespaces ltssl-<tag>-<node>,
# bridge ltb<tag>, veths lt<tag><node> (Linux caps interface names at 15 characters).
# Everything made is recorded under <state>/netns/, so netns_down removes exactly that.

NETNS_SUBNET_PREFIX=${NETNS_SUBNET_PREFIX:-10.231.0}
NETNS_SLOT_SIZE=32
NETNS_SLOTS=8

_netns_die() { echo "netns: $*" >&2; return 1; }

# netns_tag STATE_DIR -> 5 hex characters derived from the folder's absolute path
netns_tag() {
  local dir
  dir=$(realpath -m -- "$1")
  printf '%s' "$dir" | sha1sum | cut -c1-5
}

netns_ns_name() { echo "ltssl-$(netns_tag "$1")-$2"; }   # STATE NODE -> namespace name
netns_bridge_name() { echo "ltb$(netns_tag "$1")"; }      # STATE -> bridge name
netns_veth_name() { echo "lt$(netns_tag "$1")$2"; }       # STATE NODE -> host-side veth

# netns_nodes STATE -> the recorded node names, one per line (nothing when none were made)
netns_nodes() { [[ -f "$1/netns/nodes" ]] && cat "$1/netns/nodes" || true; }

# netns_addr STATE NAME -> the bridge address of a node, or of the controller (NAME = the
# controller name given to netns_up)
netns_addr() {
  local state=$1 name=$2 line
  [[ -f "$state/netns/hosts" ]] || { _netns_die "no namespaces recorded under $state"; return 1; }
  line=$(awk -v n="$name" '$2 == n {print $1; exit}' "$state/netns/hosts")
  [[ -n "$line" ]] || { _netns_die "unknown node $name (known: $(netns_nodes "$state" | tr '\n' ' '))"; return 1; }
  echo "$line"
}

# _netns_free_slot -> the first slot whose bridge address is held by no interface
_netns_free_slot() {
  local held slot
  held=$(ip -o -4 addr show | awk '{print $4}' | cut -d/ -f1)
  for ((slot = 0; slot < NETNS_SLOTS; slot++)); do
    if ! grep -qx "$NETNS_SUBNET_PREFIX.$((slot * NETNS_SLOT_SIZE + 1))" <<<"$held"; then
      echo "$slot"
      return 0
    fi
  done
  _netns_die "all $NETNS_SLOTS address slots of $NETNS_SUBNET_PREFIX.0/24 are in use (other clusters are up)"
}

# _netns_purge STATE NODE... : remove namespaces and links of these names left by an earlier
# cluster in the same folder whose records are gone (a wiped folder, a killed script)
_netns_purge() {
  local state=$1 node ns pids
  shift
  for node in "$@"; do
    ns=$(netns_ns_name "$state" "$node")
    if [[ -e "/run/netns/$ns" ]]; then
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      # shellcheck disable=SC2086
      [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "$(netns_veth_name "$state" "$node")" 2>/dev/null || true
  done
  ip link del "$(netns_bridge_name "$state")" 2>/dev/null || true
  return 0
}

# netns_up STATE CTL_NAME NODE... : make the bridge, one namespace per node, the veths and
# the hosts file, where CTL_NAME (the controller: slurmctld's host, in the root namespace)
# resolves to the bridge address. Idempotence is the caller's business: call netns_down first.
netns_up() {
  local state=$1 ctl=$2
  shift 2
  local nodes=("$@") rec="$state/netns" bridge slot base i node ns veth peer addr lock
  ((${#nodes[@]} >= 1 && ${#nodes[@]} <= 20)) || { _netns_die "need 1 to 20 nodes, got ${#nodes[@]}"; return 1; }
  command -v ip >/dev/null || { _netns_die "'ip' (iproute2) is not installed"; return 1; }
  mkdir -p "$rec"
  bridge=$(netns_bridge_name "$state")
  _netns_purge "$state" "${nodes[@]}"
  # Two bring-ups racing for the same slot: serialise the pick-and-claim. The lock is the
  # folder `ip netns` keeps its namespaces in (it makes it anyway), so nothing is left behind.
  lock=/run/netns
  mkdir -p "$lock"
  exec {_netns_lock_fd}<"$lock"
  flock "$_netns_lock_fd"
  slot=$(_netns_free_slot) || { flock -u "$_netns_lock_fd"; exec {_netns_lock_fd}>&-; return 1; }
  base=$((slot * NETNS_SLOT_SIZE))
  echo "$slot" >"$rec/slot"
  echo "$bridge" >"$rec/bridge"
  : >"$rec/nodes"
  ip link add "$bridge" type bridge
  ip addr add "$NETNS_SUBNET_PREFIX.$((base + 1))/27" dev "$bridge"
  ip link set "$bridge" up
  flock -u "$_netns_lock_fd"
  exec {_netns_lock_fd}>&-

  {
    echo "127.0.0.1 localhost"
    echo "$NETNS_SUBNET_PREFIX.$((base + 1)) $ctl"
    for i in "${!nodes[@]}"; do
      echo "$NETNS_SUBNET_PREFIX.$((base + 11 + i)) ${nodes[i]}"
    done
  } >"$rec/hosts"
  chmod 644 "$rec/hosts"

  for i in "${!nodes[@]}"; do
    node=${nodes[i]}
    ns=$(netns_ns_name "$state" "$node")
    veth=$(netns_veth_name "$state" "$node")
    peer="lp${veth#lt}"
    addr="$NETNS_SUBNET_PREFIX.$((base + 11 + i))"
    echo "$node" >>"$rec/nodes"   # recorded before made, so a failed bring-up is still torn down
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$peer"
    ip link set "$peer" netns "$ns"
    ip link set "$veth" master "$bridge"
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$peer" name eth0
    ip -n "$ns" addr add "$addr/27" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

# netns_exec STATE NODE CMD... : run CMD as node NODE: its network namespace, its own UTS
# namespace with the node's hostname, its own mount namespace with the private hosts file
# over /etc/hosts. Only the network namespace is entered (nsenter --net, not `ip netns
# exec`, which remounts /sys and hides the cgroup mounts slurmd needs).
netns_exec() {
  local state=$1 node=$2
  shift 2
  local ns
  ns=$(netns_ns_name "$state" "$node")
  [[ -e "/run/netns/$ns" ]] || { _netns_die "node $node has no namespace ($ns): is the cluster up?"; return 1; }
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    /bin/sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
    netns-exec "$node" "$state/netns/hosts" "$@"
}

# netns_start_slurmd STATE NODE LOG SLURMD_ARGS... : run `slurmd -N NODE SLURMD_ARGS` inside
# the node, its output appended to LOG. slurmd daemonizes (writing its SlurmdPidFile), so this
# returns once it has; it fails when slurmd fails to start. The command is recorded, so
# `netns.sh start NODE` brings a crashed node back the same way.
netns_start_slurmd() {
  local state=$1 node=$2 log=$3
  shift 3
  printf '%q ' "$log" "$@" >"$state/netns/$node.slurmd.args"
  setsid bash -c 'source "$1"; shift; netns_exec "$@"' netns-slurmd "${BASH_SOURCE[0]}" \
    "$state" "$node" slurmd -N "$node" "$@" </dev/null >>"$log" 2>&1
}

# netns_pids STATE NODE -> every pid running in the node's network namespace
netns_pids() {
  local ns
  ns=$(netns_ns_name "$1" "$2")
  [[ -e "/run/netns/$ns" ]] || return 0
  ip netns pids "$ns" 2>/dev/null || true
}

# netns_kill_node STATE NODE [SIGNAL] : kill every process of the node (a node crash with
# the default KILL); repeats until none is left, since dying steps may still fork.
netns_kill_node() {
  local state=$1 node=$2 sig=${3:-KILL} pids tries
  for ((tries = 0; tries < 50; tries++)); do
    pids=$(netns_pids "$state" "$node")
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    [[ "$sig" == KILL ]] || sig=KILL   # a second pass is never gentle
    sleep 0.1
  done
  _netns_die "node $node still has processes after 5 s: $(netns_pids "$state" "$node" | tr '\n' ' ')"
}

# netns_down STATE : stop every process inside the recorded namespaces (TERM to all of
# them at once, KILL after 5 s), delete the namespaces, veths and bridge, and wait until
# the kernel has really removed them (`ip netns del` finishes in the background).
netns_down() {
  local state=$1 rec="$1/netns" node ns pids bridge veth waited
  [[ -d "$rec" ]] || return 0
  mapfile -t _netns_nodes < <(netns_nodes "$state")
  pids=""
  for node in "${_netns_nodes[@]}"; do
    pids+=" $(netns_pids "$state" "$node" | tr '\n' ' ')"
  done
  # shellcheck disable=SC2086
  [[ -n "${pids// /}" ]] && kill -TERM $pids 2>/dev/null
  for ((waited = 0; waited < 50; waited++)); do
    pids=""
    for node in "${_netns_nodes[@]}"; do pids+="$(netns_pids "$state" "$node")"; done
    [[ -z "$pids" ]] && break
    sleep 0.1
  done
  for node in "${_netns_nodes[@]}"; do netns_kill_node "$state" "$node" KILL || true; done
  for node in "${_netns_nodes[@]}"; do
    ns=$(netns_ns_name "$state" "$node")
    veth=$(netns_veth_name "$state" "$node")
    ip link del "$veth" 2>/dev/null || true
    [[ -e "/run/netns/$ns" ]] && ip netns del "$ns" 2>/dev/null
  done
  bridge=$(cat "$rec/bridge" 2>/dev/null || netns_bridge_name "$state")
  ip link del "$bridge" 2>/dev/null || true
  for ((waited = 0; waited < 100; waited++)); do
    local left=0
    for node in "${_netns_nodes[@]}"; do
      ip link show "$(netns_veth_name "$state" "$node")" >/dev/null 2>&1 && left=1
      [[ -e "/run/netns/$(netns_ns_name "$state" "$node")" ]] && left=1
    done
    ip link show "$bridge" >/dev/null 2>&1 && left=1
    ((left == 0)) && break
    sleep 0.1
  done
  ((left == 0)) || { _netns_die "namespaces or links of $state still present after 10 s"; return 1; }
  rm -rf "$rec"
}

# netns_leftovers [STATE] -> namespaces and links of the cluster in STATE (every ltssl cluster
# without STATE) that still exist: a check that teardown left the machine as it found it
netns_leftovers() {
  local tag='[0-9a-f]{5}'
  [[ -n "${1:-}" ]] && tag=$(netns_tag "$1")
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^ltssl-$tag-" || true
  ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^(ltb|lt|lp)$tag" || true
}

_netns_usage() {
  cat <<'EOF'
usage: slurm/lib/netns.sh COMMAND [ARGS]   (cluster: $LTSSL_CLUSTER_DIR, default /tmp/ltssl-cluster)
  nodes                  the cluster's node names
  addr NODE              a node's address on the bridge
  exec NODE CMD...       run CMD on a node (its namespace, hostname and hosts file), e.g. srun
  pids NODE              the pids running on a node
  crash NODE             kill every process of a node (SIGKILL): a node crash
  start NODE             start the node's slurmd again as it was first started (after a crash)
  leftovers [--all]      namespaces and links of this cluster (of every ltssl cluster) still present
EOF
}

_netns_main() {
  set -euo pipefail
  local state=${LTSSL_CLUSTER_DIR:-/tmp/ltssl-cluster} cmd=${1:-help}
  shift || true
  case "$cmd" in
    nodes) netns_nodes "$state" ;;
    addr) netns_addr "$state" "$1" ;;
    exec) netns_exec "$state" "$@" ;;
    pids) netns_pids "$state" "$1" ;;
    crash) netns_kill_node "$state" "$1" KILL ;;
    start)
      local args
      [[ -f "$state/netns/$1.slurmd.args" ]] || _netns_die "node $1 has no recorded slurmd command under $state"
      args=$(cat "$state/netns/$1.slurmd.args")
      eval "netns_start_slurmd \"\$state\" \"\$1\" $args"
      ;;
    leftovers) if [[ "${1:-}" == --all ]]; then netns_leftovers; else netns_leftovers "$state"; fi ;;
    help | -h | --help) _netns_usage ;;
    *) _netns_usage >&2; return 2 ;;
  esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  _netns_main "$@"
fi
