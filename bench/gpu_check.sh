#!/usr/bin/env bash
# The half-precision checks that need a GPU, in one go (planned to take under 8 minutes on one GPU), after
# `bash install.sh`: the CUDA tests (drift at lr 0 through training, checkpoints and resume in fp16 and
# bf16; the side path and merges on CUDA), drift at lr 0 of real SmolLM2 weights in fp16 and bf16 on
# CUDA, the side path of zoo models in fp16 and bf16 and its cost at the launch-bound shape (batch 1×8),
# the kernels of LOZO's moves and update, the step benchmark for the OPT-125m and OPT-1.3b shapes in fp16
# (two passes and the batched pair), and MeZO's chunks of dense noise at the OPT-6.7b shape.
# Everything it writes lands in result/gpu_check/ (OUT overrides), with the log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-result/gpu_check}
mkdir -p "$OUT"
export LOZO_DATA_DIR=${LOZO_DATA_DIR:-$(cd .. && pwd)/shared/data}
{
    nvidia-smi -L
    python -m pytest -q -m cuda tests/test_half_precision.py tests/test_model_zoo.py tests/test_mezo_memory.py \
        tests/test_side_path.py
    for shape in opt-125m opt-1.3b; do
        python bench/side_path.py --model "shape:$shape" --device cuda --dtype float16 --batch 1 --seq 8 \
            --out "$OUT/side_path-$shape-cuda-float16.json"
    done
    python bench/half_precision.py drift --device cuda --out "$OUT/half_precision_drift.json"
    for shape in opt-125m opt-1.3b; do
        python bench/zo_step.py --model "shape:$shape" --device cuda --dtype float16 --batch 16 --seq 256 \
            --methods forward,LOZO,LOZO-M,MeZO,MeZO-in-place,FT-AdamW --out "$OUT/$shape-cuda-float16.json"
        # the batched pair (one forward of 2B rows) against two passes, and 4 directions a step (with the
        # pair: one forward of 8B rows)
        python bench/zo_step.py --model "shape:$shape" --device cuda --dtype float16 --batch 16 --seq 256 \
            --methods forward,forward-2B,LOZO,LOZO-pair,MeZO,MeZO-pair,LOZO-q4,LOZO-pair-q4,MeZO-pair-q4 \
            --out "$OUT/$shape-cuda-float16-pair.json"
    done
    # MeZO's dense noise in chunks that grow with the model (2²³ numbers at 6.7B) against chunks of 2²⁰
    python bench/zo_step.py --model shape:opt-6.7b --device cuda --dtype float16 --batch 16 --seq 256 \
        --steps 3 --warmup 1 --methods forward,MeZO,MeZO-chunk20 --out "$OUT/opt-6.7b-cuda-float16-chunks.json"
} 2>&1 | tee "$OUT/log.txt"
