#!/usr/bin/env bash
# LOZO / LOZO-M (low-rank zeroth-order SGD, with momentum when LOZO_OPTIMIZER=sgdm). Every setting
# comes from the environment; extra arguments go to run_lozo.py unchanged, e.g.
#   MODEL=facebook/opt-13b TASK=SST2 LR=1e-7 EPS=1e-3 RANK=2 STEP_INTERVAL=50 bash lozo.sh
set -euo pipefail
cd "$(dirname "$0")"
source ./launch_common.sh
RANK=${RANK:-2}
STEP_INTERVAL=${STEP_INTERVAL:-50}
LOZO_OPTIMIZER=${LOZO_OPTIMIZER:-sgd}
BETA1=${BETA1:-0.9}
TRAINER_ARGS=(--trainer LOZO --rank_r "$RANK" --step_interval "$STEP_INTERVAL"
    --lozo_optimizer "$LOZO_OPTIMIZER" --beta1 "$BETA1")
TAG=${TAG:-lozo-$LOZO_OPTIMIZER-$MODE-$STEPS-$BS-$LR-$EPS-r$RANK-nu$STEP_INTERVAL-$SEED}
zo_launch "$@"
