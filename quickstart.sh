#!/usr/bin/env bash
# One command on a fresh machine: install, convert the offline model, then run the main job on real
# SST-2 (../shared/data): zero-shot, in-context learning with 32 demonstrations, and LOZO fine-tuning
# from the zero-shot model. Results land in result/. Settings from the environment:
#   EVAL (evaluation samples, default: all 872), STEPS (LOZO steps, default 300), DATA (data folder).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
export LOZO_DATA_DIR=${DATA:-$(cd .. && pwd)/shared/data}
MODEL=models/SmolLM2-135M
EVAL_ARGS=()
[ -n "${EVAL:-}" ] && EVAL_ARGS=(--num_eval "$EVAL")
python run_lozo.py --task_name SST2 --model_name "$MODEL" --num_train 0 "${EVAL_ARGS[@]}"
python run_lozo.py --task_name SST2 --model_name "$MODEL" --num_train 32 "${EVAL_ARGS[@]}"
python run_lozo.py --task_name SST2 --model_name "$MODEL" --trainer LOZO \
    --num_train 1000 --num_dev 100 --train_set_seed 0 --per_device_train_batch_size 8 \
    --learning_rate 2e-5 --zo_eps 1e-3 --rank_r 2 --step_interval 50 --lr_scheduler_type constant \
    --train_as_classification --max_steps "${STEPS:-300}" --logging_steps 10 \
    --eval_strategy steps --eval_steps 100 --output_dir result/quickstart-lozo --tag quickstart \
    "${EVAL_ARGS[@]}"
