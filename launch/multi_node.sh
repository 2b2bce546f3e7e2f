#!/usr/bin/env bash
# One node's share of a multi-node job: run this on every node with the same RDZV_*.
# torchrun's c10d rendezvous forms the group; its elastic agent restarts the workers up
# to MAX_RESTARTS times after a failure, and they resume from the newest checkpoint.
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=job42 launch/multi_node.sh [key=value ...]
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes, or MIN:MAX for elastic)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (usually the first node)}"
CONFIG=${CONFIG:-configs/shapes_det.yaml}
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_ID=${RDZV_ID:-normpilot}
MAX_RESTARTS=${MAX_RESTARTS:-3}
# LOCAL_ADDR: this node's address for the group (default: torchrun looks it up).
# shellcheck source-path=SCRIPTDIR source=preemptible.sh
source "$(dirname "$0")/preemptible.sh"
run_preemptible "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
  -m trainer train --config "$CONFIG" "$@"
