# Settings shared by lozo.sh, mezo.sh and finetune.sh (sourced, not run). Each is read from the
# environment; the defaults are MeZO's reference settings for zeroth-order training.
MODEL=${MODEL:-facebook/opt-13b}
TASK=${TASK:-SST2}
MODE=${MODE:-ft}
BS=${BS:-16}
SEED=${SEED:-0}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
STEPS=${STEPS:-20000}
EVAL_STEPS=${EVAL_STEPS:-4000}
# Weight dtype: MeZO's fp16 on a GPU; bf16 on a CPU (where the CPU has no bf16 matrix instructions,
# run_lozo.py multiplies in float32 and rounds to bf16, as fast as float32; fp16 is slow on most CPUs).
# PRECISION=--load_float16, --load_bfloat16 or "" (float32) chooses.
if [ -z "${PRECISION+set}" ]; then
    PRECISION=$(python utils.py default-precision)
fi
MODEL_NAME=${MODEL%/}
MODEL_NAME=${MODEL_NAME##*/}

# MODE picks the trained parameters; LR and EPS default to MeZO's recommendations for zeroth-order
# training in that mode (finetune.sh sets its first-order LR before sourcing this file).
case $MODE in
    ft)
        MODE_ARGS=()
        LR=${LR:-1e-7} EPS=${EPS:-1e-3}
        ;;
    prefix)
        MODE_ARGS=(--prefix_tuning --num_prefix 5 --no_reparam --prefix_init_by_real_act)
        LR=${LR:-1e-3} EPS=${EPS:-1e-1}
        ;;
    lora)
        MODE_ARGS=(--lora)
        LR=${LR:-5e-5} EPS=${EPS:-1e-2}
        ;;
    *)
        echo "error: unknown MODE=$MODE; use ft (full-parameter), prefix or lora" >&2
        exit 2
        ;;
esac

# Per-task settings as MeZO: small dev sets for CB and Copa; multiple-choice and generation tasks
# train on the gold sequence instead of as classification.
case $TASK in
    CB | Copa) DEV=${DEV:-100} ;;
    *) DEV=${DEV:-500} ;;
esac
case $TASK in
    Copa | ReCoRD | SQuAD | DROP) TASK_ARGS=() ;;
    *) TASK_ARGS=(--train_as_classification) ;;
esac

# NUM_GPU > 1: one process per GPU through torchrun (data-parallel ZO; DDP for finetune.sh).
# TORCHRUN_ARGS adds torchrun options, e.g. the rendezvous of a multi-node run.
NUM_GPU=${NUM_GPU:-1}
TORCHRUN=(torchrun --nproc_per_node "$NUM_GPU" ${TORCHRUN_ARGS:-})
if [ "$NUM_GPU" -gt 1 ]; then LAUNCHER=("${TORCHRUN[@]}"); else LAUNCHER=(python); fi

# DRY_RUN=1: print the command (shell-quoted) instead of running it.
run_or_print() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

# LAUNCHER run_lozo.py with what every training launcher passes: model, task, output, samples, the mode's
# and the task's flags, RESUME (`last`: the newest complete checkpoint in the output folder, or a fresh
# start); then the caller's arguments (extra command-line arguments last, so they win).
launch() {
    run_or_print "${LAUNCHER[@]}" run_lozo.py \
        --model_name "$MODEL" --task_name "$TASK" \
        --output_dir "result/$TASK-$MODEL_NAME-$TAG" --tag "$TAG" \
        --train_set_seed "$SEED" --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" \
        --per_device_train_batch_size "$BS" --learning_rate "$LR" --logging_steps 10 \
        --save_total_limit 1 --load_best_model_at_end $PRECISION "${MODE_ARGS[@]}" "${TASK_ARGS[@]}" \
        ${RESUME:+--resume_from_checkpoint "$RESUME"} "$@"
}

# Zeroth-order training (lozo.sh, mezo.sh): MeZO's constant schedule, evaluation and checkpoints by steps.
zo_launch() {
    launch --max_steps "$STEPS" --zo_eps "$EPS" --lr_scheduler_type constant \
        --eval_strategy steps --eval_steps "$EVAL_STEPS" --save_strategy steps --save_steps "$EVAL_STEPS" \
        "${TRAINER_ARGS[@]}" "$@"
}

# First-order fine-tuning (finetune.sh; finetune_fsdp.sh with its LAUNCHER and FSDP options first).
fo_launch() {
    launch --trainer regular --num_train_epochs "$EPOCH" --eval_strategy epoch --save_strategy epoch "$@"
}
