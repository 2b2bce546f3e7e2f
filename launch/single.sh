#!/usr/bin/env bash
# One process on whatever device is there (one GPU, or the CPU): the single-device run.
#   launch/single.sh [key=value ...]          CONFIG=configs/shapes_cls.yaml launch/single.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/shapes_det.yaml}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m trainer train --config "$CONFIG" "$@"
