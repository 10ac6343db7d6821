#!/usr/bin/env bash
# First-order fine-tuning sharded over NUM_GPU processes with FSDP2: parameters, gradients and AdamW state
# fully sharded; each decoder layer (the class the model lists in `_no_split_modules`, e.g. OPTDecoderLayer
# or LlamaDecoderLayer) is wrapped on its own. Every setting comes from the environment as in finetune.sh;
# extra arguments go to run_lozo.py unchanged, e.g.
#   NUM_GPU=4 MODEL=facebook/opt-13b TASK=SST2 MODE=ft LR=1e-5 bash finetune_fsdp.sh
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-facebook/opt-13b}
NUM_GPU=${NUM_GPU:-2}
BS=${BS:-8}
LR=${LR:-1e-5}
EPOCH=${EPOCH:-5}
PRECISION=${PRECISION-} # first-order training keeps float32 weights unless asked
source ./launch_common.sh
TAG=${TAG:-fsdp-$MODE-$EPOCH-$BS-$LR-$SEED}
if [ "$MODE" != ft ]; then # the FSDP options below shard full-parameter training only
    echo "error: finetune_fsdp.sh trains all parameters; use MODE=ft" >&2
    exit 2
fi
if [ "$NUM_GPU" -lt 2 ]; then
    echo "error: FSDP shards over several processes; set NUM_GPU to 2 or more (or use finetune.sh)" >&2
    exit 2
fi
# No transformer_layer_cls_to_wrap: accelerate then wraps the model's own `_no_split_modules` classes.
FSDP_CONFIG='{"version": 2, "reshard_after_forward": true, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}'

LAUNCHER=("${TORCHRUN[@]}")
fo_launch --no_auto_device --fsdp --fsdp_config "$FSDP_CONFIG" "$@"
