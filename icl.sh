#!/usr/bin/env bash
# Zero-shot (TRAIN=0) and in-context learning with MeZO's defaults: 32 demonstrations, 1,000 evaluation
# samples, one demonstration set per evaluation sample. Extra arguments go to run_lozo.py, e.g.
#   MODEL=facebook/opt-13b TASK=SST2 bash icl.sh --sfc
set -euo pipefail
cd "$(dirname "$0")"
TRAIN=${TRAIN:-32}
source ./launch_common.sh # MODEL, TASK, EVAL, PRECISION and the model's short name
if [ "$TRAIN" = 0 ]; then TAG=${TAG:-zeroshot}; else TAG=${TAG:-icl}; fi

run_or_print python run_lozo.py \
    --model_name "$MODEL" --task_name "$TASK" \
    --output_dir "result/$TASK-$MODEL_NAME-$TAG" --tag "$TAG" \
    --num_train "$TRAIN" --num_eval "$EVAL" $PRECISION "$@"
