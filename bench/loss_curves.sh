#!/usr/bin/env bash
# Loss-curve study: MeZO vs LOZO vs LOZO-M on SmolLM2-135M and real SST-2 at an equal number of forward
# passes (same steps, same batch), then one PNG of smoothed training loss and dev accuracy against
# forward passes. Settings from the environment: STEPS (300), BS (8), LR (2e-5), EPS (1e-3), EVAL_STEPS (100).
set -euo pipefail
cd "$(dirname "$0")/.."
export LOZO_DATA_DIR=${LOZO_DATA_DIR:-$(cd .. && pwd)/shared/data}
STEPS=${STEPS:-300}
BS=${BS:-8}
LR=${LR:-2e-5}
EPS=${EPS:-1e-3}
EVAL_STEPS=${EVAL_STEPS:-100}
declare -A METHOD_ARGS=(
    [LOZO]="--trainer LOZO"
    [LOZO-M]="--trainer LOZO --lozo_optimizer sgdm --beta1 0.9"
    [MeZO]="--trainer zo"
)
for method in LOZO LOZO-M MeZO; do
    # shellcheck disable=SC2086  # the method's arguments are meant to split
    python run_lozo.py --task_name SST2 --model_name models/SmolLM2-135M ${METHOD_ARGS[$method]} \
        --num_train 1000 --num_dev 100 --train_set_seed 0 --per_device_train_batch_size "$BS" \
        --learning_rate "$LR" --zo_eps "$EPS" --lr_scheduler_type constant --train_as_classification \
        --max_steps "$STEPS" --logging_steps 10 --eval_strategy steps --eval_steps "$EVAL_STEPS" \
        --output_dir "result/train/$method-smollm2-sst2" --tag "$method-curves"
done
python bench/plot_training.py LOZO=result/train/LOZO-smollm2-sst2 LOZO-M=result/train/LOZO-M-smollm2-sst2 \
    MeZO=result/train/MeZO-smollm2-sst2 --out docs/sst2_training_curves.png \
    --title "SmolLM2-135M, SST-2, batch $BS, lr $LR"
