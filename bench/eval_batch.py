"""What scoring several evaluation samples per forward saves: zero-shot validation samples of real tasks
scored one at a time (MeZO's way, `--per_device_eval_batch_size 1`: all candidates of a sample in one
padded forward, a shared prompt from the KV cache) and --batch at a time (run_lozo's default: batched as a
training batch is, one packed row per sample when every option is one token), on the same model.

    python bench/eval_batch.py --model models/SmolLM2-135M --dtype bfloat16 --threads 1

Per task: seconds per sample each way, timed in alternation chunk by chunk (so a shared machine's load
slows both alike), and how far the two ways' scores are apart in this dtype (the same function: only the
rounding of differently shaped products differs), with the samples whose prediction differs. Writes
--out (default result/bench/eval_batch-<dtype>.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tasks  # noqa: E402
from run_lozo import Framework, parse_args, product_dtype  # noqa: E402
from utils import (  # noqa: E402
    needs_float32_products,
    portable,
    products_for,
)

DTYPE_FLAGS = {"bfloat16": ["--load_bfloat16"], "float16": ["--load_float16"], "float32": []}


def compare(framework, samples, batch):
    """(seconds one at a time, seconds batched, largest score difference, indices predicted differently)."""
    one_time = batch_time = largest = 0.0
    flips = []
    for start in range(0, len(samples), batch):
        pairs = [([], sample) for sample in samples[start : start + batch]]
        began = time.perf_counter()
        single = [torch.tensor(framework.one_sample_scores(*pair)) for pair in pairs]
        one_time += time.perf_counter() - began
        began = time.perf_counter()
        batched = framework.batch_scores(pairs)
        batch_time += time.perf_counter() - began
        for offset, (a, b) in enumerate(zip(single, batched, strict=True)):
            largest = max(largest, float((a - b.float()).abs().max()))
            if int(a.argmax()) != int(b.argmax()):
                flips.append(start + offset)
    return one_time, batch_time, largest, flips


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M"))
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_FLAGS)
    parser.add_argument("--tasks", nargs="+", default=["SST2", "RTE", "WIC"])
    parser.add_argument("--samples", type=int, default=64, help="validation samples per task")
    parser.add_argument("--batch", type=int, default=8, help="samples per batched forward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", help="report path (default: result/bench/eval_batch-<dtype>.json)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    report = {
        "model": portable(opts.model),
        "dtype": opts.dtype,
        "batch": opts.batch,
        "threads": torch.get_num_threads(),
    }
    framework = None
    for name in opts.tasks:
        argv = ["--task_name", name, "--model_name", opts.model, *DTYPE_FLAGS[opts.dtype]]
        argv += [
            "--data_dir",
            opts.data_dir,
            "--output_dir",
            "result/bench/eval_batch",
            "--report_to",
            "none",
        ]
        args = parse_args(argv)
        task = tasks.get_task(name, opts.data_dir)
        if framework is None:
            framework = Framework(args, task)
        framework.args, framework.task, framework.template = args, task, task.get_template()
        samples = task.sample_eval_samples(opts.samples, seed=0)
        report["float32_products"] = needs_float32_products(product_dtype(args))
        with products_for(product_dtype(args)):  # float32 products on a CPU without a bf16 unit, as run_lozo
            one, batched, largest, flips = compare(framework, samples, opts.batch)
        report[name] = {
            "samples": len(samples),
            "seconds_per_sample_one_at_a_time": round(one / len(samples), 4),
            "seconds_per_sample_batched": round(batched / len(samples), 4),
            "speedup": round(one / batched, 2),
            "largest_score_difference": largest,
            "predictions_differing": flips,
        }
        print(name, json.dumps(report[name]), flush=True)
    out = Path(opts.out or REPO / "result" / "bench" / f"eval_batch-{opts.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("written", out)


if __name__ == "__main__":
    main()
