#!/usr/bin/env bash
# One process of a multi-node perijax run without a scheduler: start it on every node with the
# same coordinator (node 0's address and a free port), the node count and this node's rank, then
# the command. docs/launching.md has the recipe.
#   node 0:  launch/multinode.sh 10.0.0.1:12355 4 0 -- perijax train --workdir /shared/runs/x ...
#   node 3:  launch/multinode.sh 10.0.0.1:12355 4 3 -- perijax train --workdir /shared/runs/x ...
set -euo pipefail
usage="usage: multinode.sh COORDINATOR_HOST:PORT NUM_NODES NODE_RANK -- COMMAND [ARGS...]"
if [[ $# -lt 5 || $4 != "--" ]]; then
  echo "$usage" >&2
  exit 2
fi
coordinator=$1
nodes=$2
rank=$3
shift 4
if [[ ! $coordinator =~ ^[^:]+:[0-9]+$ ]]; then
  echo "multinode.sh: the coordinator must be HOST:PORT, got '$coordinator'" >&2
  exit 2
fi
if [[ ! $nodes =~ ^[1-9][0-9]*$ || ! $rank =~ ^[0-9]+$ ]] || ((rank >= nodes)); then
  echo "multinode.sh: need NUM_NODES >= 1 and 0 <= NODE_RANK < NUM_NODES, got $nodes and $rank" >&2
  exit 2
fi
# perijax.distributed reads these and starts jax.distributed before anything else.
export PERIJAX_COORDINATOR_ADDRESS="$coordinator"
export PERIJAX_NUM_PROCESSES="$nodes"
export PERIJAX_PROCESS_ID="$rank"
exec "$@"
