#!/usr/bin/env bash
# First-order fine-tuning (HF Trainer, AdamW) with MeZO's settings. Every setting comes from the
# environment; extra arguments go to run_lozo.py unchanged, e.g.
#   MODEL=facebook/opt-1.3b TASK=SST2 LR=1e-5 bash finetune.sh
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-facebook/opt-1.3b}
BS=${BS:-8}
MODE=${MODE:-ft}
case $MODE in # MeZO's first-order learning rates per mode
    ft) LR=${LR:-1e-5} ;;
    prefix) LR=${LR:-1e-2} ;;
    lora) LR=${LR:-1e-4} ;;
esac
EPOCH=${EPOCH:-5}
PRECISION=${PRECISION-} # first-order training keeps float32 weights unless asked
source ./launch_common.sh
TAG=${TAG:-ft-$MODE-$EPOCH-$BS-$LR-$SEED}

fo_launch "$@"
