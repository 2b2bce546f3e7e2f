#!/usr/bin/env bash
# All GPUs of one machine (or NPROC CPU processes over gloo) under torchrun --standalone.
#   launch/single_node.sh [key=value ...]     NPROC=2 launch/single_node.sh train.max_steps=100
set -euo pipefail
CONFIG=${CONFIG:-configs/shapes_det.yaml}
PYTHON=${PYTHON:-python}
# Default: one process per visible GPU, or 1 on a CPU-only machine.
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
# shellcheck source-path=SCRIPTDIR source=preemptible.sh
source "$(dirname "$0")/preemptible.sh"
run_preemptible "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m trainer train --config "$CONFIG" "$@"
