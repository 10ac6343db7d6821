#!/usr/bin/env bash
# One command on a fresh machine: install, convert the offline model, then on real SST-2 (../shared/data)
# zero-shot, in-context learning with 32 demonstrations, and LOZO fine-tuning from the zero-shot model with
# its training-curve plot. It ends with a summary: what ran, the metrics, every file written.
#
#   bash quickstart.sh          the short version (README: measured wall time), in the launchers'
#                               precision: bf16 on a CPU, fp16 on a GPU (python utils.py default-precision)
#   FULL=1 bash quickstart.sh   the README's full-size numbers: float32, all 872 validation samples for
#                               ICL and LOZO, 300 LOZO steps (README: measured wall time)
#
# Settings from the environment: EVAL (zero-shot and final evaluation samples), ICL_EVAL (ICL samples),
# STEPS (LOZO steps), PRECISION (--load_bfloat16, --load_float16 or "" for float32), DATA (data folder),
# OUT (output folder, default result/quickstart, or result/quickstart-full with FULL=1). Other settings
# need another OUT: run_lozo.py stops rather than replace a result that other settings made.
set -euo pipefail
cd "$(dirname "$0")"
started=$SECONDS
bash install.sh
export LOZO_DATA_DIR=${DATA:-$(cd .. && pwd)/shared/data}
MODEL=models/SmolLM2-135M
if [ "${FULL:-0}" = 1 ]; then
    EVAL=${EVAL:-} ICL_EVAL=${ICL_EVAL:-} STEPS=${STEPS:-300} PRECISION=${PRECISION-}
    OUT=${OUT:-result/quickstart-full}
else
    EVAL=${EVAL:-} ICL_EVAL=${ICL_EVAL:-100} STEPS=${STEPS:-150} PRECISION=${PRECISION-$(python utils.py default-precision)}
    OUT=${OUT:-result/quickstart}
fi
samples() { [ -n "$1" ] && echo "--num_eval $1"; true; } # empty: the whole validation split
# shellcheck disable=SC2046,SC2086  # the optional flags are meant to split
python run_lozo.py --task_name SST2 --model_name "$MODEL" --num_train 0 $(samples "$EVAL") $PRECISION \
    --result_file "$OUT/zero-shot.json"
python run_lozo.py --task_name SST2 --model_name "$MODEL" --num_train 32 $(samples "$ICL_EVAL") $PRECISION \
    --result_file "$OUT/icl-32.json"
python run_lozo.py --task_name SST2 --model_name "$MODEL" --trainer LOZO $(samples "$EVAL") $PRECISION \
    --num_train 1000 --num_dev 100 --train_set_seed 0 --per_device_train_batch_size 8 \
    --learning_rate 2e-5 --zo_eps 1e-3 --rank_r 2 --step_interval 50 --lr_scheduler_type constant \
    --train_as_classification --max_steps "$STEPS" --logging_steps 10 \
    --eval_strategy steps --eval_steps $((STEPS / 3)) --output_dir "$OUT/lozo" --result_file "$OUT/lozo.json"
python bench/plot_training.py "LOZO=$OUT/lozo" --out "$OUT/lozo-training-curves.png" \
    --title "SmolLM2-135M, SST-2, LOZO, batch 8, lr 2e-5"
echo
echo "quickstart finished in $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s"
python utils.py summarize "$OUT"
