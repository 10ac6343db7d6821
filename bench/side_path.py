"""What LOZO's side path adds to a forward pass: the model at θ+εZ against the same model unhooked.

    python bench/side_path.py --model models/SmolLM2-135M --dtype bfloat16 --batch 1 --seq 8
    python bench/side_path.py --model shape:opt-125m --device cuda --dtype float16 --batch 1 --seq 8

A small batch is the launch-bound shape of most GPU forwards of small and medium models: there the cost
of the side path is its per-call overhead, not its arithmetic. The hooked model carries merge_periods − 1
finished V periods not yet merged (the widest side path a run has) and sits at θ+εZ of its next step. The
two forwards alternate, --repeats times each, so a shared machine's load slows both alike; the report is
the ratio of the medians, and a single nn.Linear(64, 64) on 8 rows, plain and hooked, for the per-call
cost.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from zo_step import load_model, real_batch  # noqa: E402

from LOZOtrainer import ZOOptimizer  # noqa: E402
from utils import (  # noqa: E402
    cpu_info,
    portable,
    products_for,
)


def hooked_at_plus_eps(model, merge_periods=8):
    """A LOZO optimizer over every parameter of `model`, attached, with merge_periods − 1 unmerged periods,
    at θ+εZ."""
    optimizer = ZOOptimizer(
        model.parameters(), lr=1e-6, eps=1e-3, low_rank=True, step_interval=1, merge_periods=merge_periods
    )
    optimizer.attach(model)
    for _ in range(merge_periods - 1):  # then the last begin_step adds the (merge_periods − 1)-th period
        optimizer.begin_step()
        optimizer.move_to(+1)
        optimizer.move_to(-1)
        optimizer.set_projected_grad(1.0)
        optimizer.step()
    optimizer.begin_step()
    optimizer.move_to(+1)
    assert max(matrix.periods for matrix in optimizer.matrices.values()) == merge_periods - 1
    return optimizer


def median_pair(plain, hooked, repeats, synchronized):
    times = {"plain": [], "hooked": []}
    for _ in range(repeats):
        for name, function in (("plain", plain), ("hooked", hooked)):
            start = time.perf_counter()
            function()
            synchronized()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M"))
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", help="JSON report")
    opts = parser.parse_args()

    dtype = getattr(torch, opts.dtype)
    torch.manual_seed(0)
    plain_model, tokenizer = load_model(opts.model, dtype, opts.device)
    hooked_model, _ = load_model(opts.model, dtype, opts.device)
    plain_model.eval(), hooked_model.eval()
    batch = real_batch(tokenizer, plain_model.config.vocab_size, opts.batch, opts.seq, opts.device)
    ids = batch["input_ids"]
    optimizer = hooked_at_plus_eps(hooked_model)

    def synchronized():
        if opts.device == "cuda":
            torch.cuda.synchronize()

    layer = torch.nn.Linear(64, 64, dtype=dtype, device=opts.device)
    hooked_layer = torch.nn.Linear(64, 64, dtype=dtype, device=opts.device)
    layer_optimizer = hooked_at_plus_eps(hooked_layer)
    x = torch.randn(8, 64, dtype=dtype, device=opts.device)
    with torch.inference_mode(), products_for(dtype):
        for _ in range(3):  # warm-up
            plain_model(ids), hooked_model(ids)
        forward = median_pair(lambda: plain_model(ids), lambda: hooked_model(ids), opts.repeats, synchronized)
        linear = median_pair(lambda: layer(x), lambda: hooked_layer(x), 2000, synchronized)
    report = {
        "model": portable(opts.model),
        "dtype": opts.dtype,
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else cpu_info("model name"),
        "batch": [opts.batch, opts.seq],
        "matrices": len(optimizer.matrices),
        "forward_plain_s": forward["plain"],
        "forward_hooked_s": forward["hooked"],
        "forward_ratio": forward["hooked"] / forward["plain"],
        "linear_plain_us": linear["plain"] * 1e6,
        "linear_hooked_us": linear["hooked"] * 1e6,
    }
    del layer_optimizer
    print(json.dumps(report, indent=1))
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
