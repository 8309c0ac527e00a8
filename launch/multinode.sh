#!/usr/bin/env bash
# Run the same command on every node; node 0's address is the rendezvous endpoint.
#   NNODES=2 NODE_RANK=0 RDZV=node0:29400 NPROC=8 launch/multinode.sh CONFIG [key=value ...]
# RDZV is node 0's address as the other nodes reach it; RDZV_TIMEOUT (default 600) is how long
# the nodes wait for each other at the start.
set -euo pipefail
config=${1:?usage: NNODES=.. NODE_RANK=.. RDZV=host:port NPROC=.. launch/multinode.sh CONFIG [key=value ...]}
shift
exec dist-train train "$config" \
  --nproc "${NPROC:?set NPROC (workers per node)}" \
  --nnodes "${NNODES:?set NNODES}" \
  --node-rank "${NODE_RANK:?set NODE_RANK}" \
  --rdzv-endpoint "${RDZV:?set RDZV=host:port of node 0}" \
  --rdzv-id "${RDZV_ID:-dist_train}" --rdzv-timeout "${RDZV_TIMEOUT:-600}" "$@"
