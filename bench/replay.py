"""What a resume from a step checkpoint (--zo_trajectory_checkpoints) costs: the time to replay N recorded
steps onto the starting weights, and the size of the record, per method.

    python bench/replay.py --model models/SmolLM2-135M --dtype bfloat16 --steps 1000 --mezo-steps 50

Each method takes N steps with made-up projected gradients (no forward pass: a replay has none either),
its record is written as a checkpoint holds it, and a fresh optimizer on the starting weights replays it;
the replayed weights must equal the stepped ones bit for bit. MeZO's replay is one Gaussian draw over
every weight a step, so it is timed over fewer steps (--mezo-steps) and reported per step.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from LOZOtrainer import ZOOptimizer  # noqa: E402
from utils import cpu_lacks_fast_matmul  # noqa: E402

METHODS = {
    "LOZO": dict(low_rank=True, rank=2, step_interval=50),
    "LOZO-M": dict(low_rank=True, rank=2, step_interval=50, momentum=0.9),
    "MeZO": dict(),
}


def optimizer_for(model, settings):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ZOOptimizer(params, lr=1e-6, eps=1e-3, seed=0, replayable=True, **settings)
    optimizer.attach(model)
    return optimizer


def run(model_dir, dtype, method, steps):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)

    model = load()
    stepper = optimizer_for(model, METHODS[method])
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for _ in range(steps):
        stepper.begin_step()
        stepper.set_projected_grad(torch.randn((), generator=generator).item())
        stepper.step()
    stepped_s = time.perf_counter() - began
    stepper.settle()
    record = json.dumps(stepper.record())

    fresh = load()
    replayer = optimizer_for(fresh, METHODS[method])
    began = time.perf_counter()
    replayer.replay(json.loads(record), log_every=10**9)
    replay_s = time.perf_counter() - began
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    return {
        "steps": steps,
        "replay_s": round(replay_s, 2),
        "replay_s_per_step": round(replay_s / steps, 4),
        "stepped_s": round(stepped_s, 2),
        "record_bytes": len(record),
        "bit_identical": same,
    }


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=1000, help="steps replayed for LOZO and LOZO-M")
    parser.add_argument("--mezo-steps", type=int, default=50, help="steps replayed for MeZO")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the results to this JSON file")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    results = {"model": Path(opts.model).name, "dtype": opts.dtype, "threads": opts.threads, "cpu": cpu}
    results |= {"cpu_bf16_matmul": not cpu_lacks_fast_matmul(torch.bfloat16), "methods": {}}
    for method in METHODS:
        steps = opts.mezo_steps if method == "MeZO" else opts.steps
        results["methods"][method] = run(opts.model, dtype, method, steps)
        print(method, results["methods"][method], flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
