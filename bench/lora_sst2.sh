#!/usr/bin/env bash
# MeZO-LoRA vs LOZO-LoRA on SmolLM2-135M and real SST-2: LoRA (r 8, alpha 16) on q/v, 1000 train / 100 dev
# samples, batch 8, STEPS (300) steps, lr LR (1e-3: 1e-2 diverged in a 60-step probe), eps 1e-2 (MeZO's for
# LoRA), evaluated on all 872 validation samples. Before training the LoRA model is the zero-shot model
# (B = 0). METHODS picks the runs (default "MeZO LOZO"). Results land in
# result/SST2-SmolLM2-135M-ntrain1000-ndev100-<method>-lora-lr<LR>-trainset0.json, the adapters beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOZO_DATA_DIR=${LOZO_DATA_DIR:-$(cd .. && pwd)/shared/data}
STEPS=${STEPS:-300}
LR=${LR:-1e-3}
METHODS=${METHODS:-MeZO LOZO}
declare -A METHOD_ARGS=([MeZO]="--trainer zo" [LOZO]="--trainer LOZO")
for method in $METHODS; do
    # shellcheck disable=SC2086  # the method's arguments are meant to split
    python run_lozo.py --task_name SST2 --model_name models/SmolLM2-135M ${METHOD_ARGS[$method]} --lora \
        --num_train 1000 --num_dev 100 --train_set_seed 0 --per_device_train_batch_size 8 \
        --learning_rate "$LR" --zo_eps 1e-2 --lr_scheduler_type constant --train_as_classification \
        --max_steps "$STEPS" --logging_steps 10 --output_dir "result/train/$method-lora-lr$LR-smollm2-sst2" \
        --tag "$method-lora-lr$LR"
done
