#!/usr/bin/env bash
# MeZO (zeroth-order SGD with dense Gaussian directions). Every setting comes from the environment;
# extra arguments go to run_lozo.py unchanged, e.g.
#   MODEL=facebook/opt-13b TASK=SST2 LR=1e-7 EPS=1e-3 bash mezo.sh --save_model
set -euo pipefail
cd "$(dirname "$0")"
source ./launch_common.sh
TRAINER_ARGS=(--trainer zo)
TAG=${TAG:-mezo-$MODE-$STEPS-$BS-$LR-$EPS-$SEED}
zo_launch "$@"
