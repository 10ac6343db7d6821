"""Half precision against float32: drift at learning rate 0, the update's rounding error at the papers'
learning rates, and the optimizer's extra memory, for LOZO, LOZO-M and MeZO in each arithmetic mode.

    python bench/half_precision.py record   # 100 real projected gradients: SmolLM2-135M, SST-2, LOZO, float32
    python bench/half_precision.py          # the table of the README's "Half precision" section
    python bench/half_precision.py drift --device cuda   # the drift rows alone, on a GPU

The replay runs the project's `ZOOptimizer` (no forward passes: at a given projected gradient the update
does not depend on them) over every tensor of a few SmolLM2 decoder layers (`--layers`), real weights:

* drift: 300 steps at lr 0, ε = 1e-3 (every step moves to θ+εZ, θ−εZ and back): ‖W − W₀‖ / ‖W₀‖, and
  whether every weight is bit-identical;
* update error: the recorded projected gradients replayed (cycled past 100) at lr 2e-5, 1e-6 and 1e-7:
  ‖ΔW_dtype − ΔW_float32‖ / ‖ΔW_float32‖, ΔW being the change of the weights the model computes with
  (`ZOOptimizer.effective_weight`), against the same method and mode in float32 — and in brackets the
  fraction of ΔW_float32 that ΔW keeps, ⟨ΔW, ΔW_float32⟩ / ‖ΔW_float32‖²: rounding to nearest loses
  small updates (kept < 1), stochastic rounding keeps them in expectation at the price of noise;
* extra memory: the optimizer's largest state over the run (float32 masters, LOZO's factors, momentum),
  as a fraction of the weights' own bytes in that dtype.

Modes: "default" is the project's default (LOZO: low-rank side path and float32 vectors; MeZO: each module
perturbed for its own forward, the update stochastically rounded); "master" is MeZO's `--zo_master_weights`
(a float32 master copy); "compensated" is MeZO's `--zo_compensated` (rounding to nearest, the error kept
in a buffer of the weights' dtype and carried into the next update); "in-place" writes θ ± εZ into the
weights — MeZO's `--zo_in_place`, and for LOZO a restatement of this repository's earlier step (perturb,
restore and update with addmm_ in the weights' dtype), kept here as the reference the default mode
replaced.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from LOZOtrainer import U_STREAM, V_STREAM, ZOOptimizer, gaussian, stream_seed  # noqa: E402
from utils import portable  # noqa: E402

GRADS = REPO / "docs" / "half_precision" / "projected_grads.json"
DTYPES = ("float32", "bfloat16", "float16")
LRS = (2e-5, 1e-6, 1e-7)
EPS, SEED, DRIFT_STEPS = 1e-3, 0, 300
METHODS = {"LOZO": dict(low_rank=True), "LOZO-M": dict(low_rank=True, momentum=0.9), "MeZO": {}}
MODES = {  # each method's arithmetic modes, and what selects them
    "LOZO": {"default": {}, "in-place": {}},
    "LOZO-M": {"default": {}, "in-place": {}},
    "MeZO": {
        "default": {},
        "compensated": dict(compensated=True),
        "master": dict(master_weights=True),
        "in-place": dict(in_place=True),
    },
}


class InPlaceLOZO:
    """The earlier in-place LOZO step, restated: θ ± εUVᵀ is written into the weights (each move rounds to
    the weights' dtype), and one addmm_ per matrix restores and updates (LOZO-M: momentum N, m×r, carried
    into a new V's basis as N·V_oldᵀV_new/n). Vectors move along dense z."""

    def __init__(self, params, lr, momentum=None, rank=2, step_interval=50):
        self.params, self.lr, self.beta, self.rank, self.interval = params, lr, momentum, rank, step_interval
        self.step_count, self.V, self.N = 0, {}, {}

    def left(self, i, p):  # U for a matrix, z for a vector
        seed = stream_seed(SEED, U_STREAM, self.step_count, i)
        return gaussian((p.shape[0], self.rank) if p.dim() == 2 else p.shape, seed, p.device)

    def add(self, p, i, left, alpha):
        """p ← round(p + alpha·left·Vᵀ): computed in float32, rounded once, as addmm_ in p's dtype does
        (written out because a float16 addmm_ on a CPU without float16 matrix units is ~80× slower)."""
        if p.dim() == 2:
            p.data.copy_(torch.addmm(p.data.float(), left, self.V[i].T, alpha=alpha))
        else:
            p.data.copy_(p.data.float().add_(left, alpha=alpha))

    def take_step(self, g):
        if self.step_count % self.interval == 0:
            period = self.step_count // self.interval
            for i, p in enumerate(self.params):
                if p.dim() == 2:
                    V = gaussian((p.shape[1], self.rank), stream_seed(SEED, V_STREAM, period, i), p.device)
                    if i in self.N:
                        self.N[i] = self.N[i] @ (self.V[i].T @ V) / p.shape[1]
                    self.V[i] = V
        for scale in (+1, -2):
            for i, p in enumerate(self.params):
                self.add(p, i, self.left(i, p), scale * EPS)
        for i, p in enumerate(self.params):
            z = self.left(i, p)
            if self.beta is None:
                self.add(p, i, (EPS - self.lr * g) * z, 1.0)  # restore and update together
                continue
            self.N[i] = (
                (1 - self.beta) * g * z
                if i not in self.N
                else self.beta * self.N[i] + (1 - self.beta) * g * z
            )
            self.add(p, i, EPS * z - self.lr * self.N[i], 1.0)
        self.step_count += 1

    def effective_weight(self, p):
        return p.detach().float()

    def state_bytes(self):
        return sum(t.numel() * 4 for t in [*self.V.values(), *self.N.values()])


def state_bytes(optimizer):
    if isinstance(optimizer, InPlaceLOZO):
        return optimizer.state_bytes()
    tensors = [*optimizer.masters.values(), *optimizer.momentum.values(), *optimizer.compensation.values()]
    for matrix in optimizer.matrices.values():
        tensors += [matrix.left, matrix.right, matrix.C, matrix.U]
    return sum(t.numel() * t.element_size() for t in tensors)


def replay(weights, method, mode, dtype, lr, grads, steps):
    """(start, end) effective weights in float32 and the largest optimizer state, after `steps` steps."""
    params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in weights]
    start = [p.detach().float().clone() for p in params]
    if mode == "in-place" and method != "MeZO":
        optimizer = InPlaceLOZO(params, lr, momentum=METHODS[method].get("momentum"))
    else:
        settings = METHODS[method] | MODES[method][mode]
        optimizer = ZOOptimizer(params, lr=lr, eps=EPS, seed=SEED, **settings)
    largest = 0
    for step in range(steps):
        g = grads[step % len(grads)]
        if isinstance(optimizer, InPlaceLOZO):
            optimizer.take_step(g)
        else:
            optimizer.begin_step()
            optimizer.move_to(+1)
            optimizer.move_to(-1)
            optimizer.set_projected_grad(g)
            optimizer.step()
        largest = max(largest, state_bytes(optimizer))
    end = [optimizer.effective_weight(p) for p in params]
    if not isinstance(optimizer, InPlaceLOZO):
        optimizer.settle()  # what a checkpoint would hold
    saved = [p.detach() for p in params]
    return start, end, saved, largest / sum(p.numel() * p.element_size() for p in params)


def norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


def difference(a, b):
    return [x - y for x, y in zip(a, b, strict=True)]


def drift(weights, method, mode, dtype):
    start, end, saved, memory = replay(weights, method, mode, dtype, 0.0, [20.0], DRIFT_STEPS)
    original = [w.to(dtype) for w in weights]
    return {
        "drift": norm(difference(end, start)) / norm(start),
        "bit_identical": all(torch.equal(s, o) for s, o in zip(saved, original, strict=True)),
        "extra_memory": memory,
    }


def update_error(weights, method, mode, dtype, lr, grads, steps, reference):
    """(‖ΔW − ΔW_float32‖ / ‖ΔW_float32‖, the fraction of ΔW_float32 that ΔW contains, extra memory)."""
    start, end, _, memory = replay(weights, method, mode, dtype, lr, grads, steps)
    change = difference(end, start)
    dot = sum((a.double() * b.double()).sum() for a, b in zip(change, reference, strict=True)).item()
    return norm(difference(change, reference)) / norm(reference), dot / norm(reference) ** 2, memory


def load_weights(model, layers):
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    prefixes = tuple(f"model.layers.{layer}." for layer in layers)
    return [t.clone() for name, t in state.items() if name.startswith(prefixes)]


def measure(opts):
    grads = json.loads(Path(opts.grads).read_text())["projected_grads"]
    weights = [w.to(opts.device) for w in load_weights(opts.model, [int(x) for x in opts.layers.split(",")])]
    print(f"{sum(w.numel() for w in weights) / 1e6:.1f}M weights, {len(grads)} gradients", file=sys.stderr)
    rows = []
    for method in opts.methods.split(","):
        for mode in [m for m in MODES[method] if not opts.modes or m in opts.modes.split(",")]:
            references = {}
            for dtype_name in DTYPES:
                dtype, began = getattr(torch, dtype_name), time.time()
                row = {"method": method, "mode": mode, "dtype": dtype_name}
                row |= drift(weights, method, mode, dtype)
                for lr in opts.lrs if opts.command == "measure" else ():
                    longer = 1000 if method != "MeZO" else opts.mezo_steps  # MeZO draws every weight a step
                    for steps in (100, longer) if longer else (100,):
                        if dtype == torch.float32:
                            start, end, _, _ = replay(weights, method, mode, dtype, lr, grads, steps)
                            references[lr, steps] = difference(end, start)
                        error, kept, memory = update_error(
                            weights, method, mode, dtype, lr, grads, steps, references[lr, steps]
                        )
                        row[f"error_lr{lr:g}_{steps}"], row[f"kept_lr{lr:g}_{steps}"] = error, kept
                        row["extra_memory"] = max(row["extra_memory"], memory)
                rows.append(row)
                print(f"  {method} {mode} {dtype_name}: {time.time() - began:.0f} s", file=sys.stderr)
    return {
        "model": portable(opts.model),
        "layers": opts.layers,
        "device": opts.device,
        "eps": EPS,
        "drift_steps": DRIFT_STEPS,
        "rows": rows,
    }


def cell(row, key):
    at_100, at_1000 = row.get(f"{key}_100"), row.get(f"{key}_1000")
    if at_100 is None:
        return "—"
    return f"{at_100:.2g} / " + ("—" if at_1000 is None else f"{at_1000:.2g}")


def table(report):
    lrs = [lr for lr in LRS if f"error_lr{lr:g}_100" in report["rows"][0]]
    header = "| method | mode | dtype | drift, 300 steps at lr 0 | bit-identical | "
    header += "".join(f"error (kept) lr {lr:g}, 100 / 1000 steps | " for lr in lrs) + "extra memory |"
    lines = [header, "|" + "---|" * (6 + len(lrs))]
    for row in report["rows"]:
        errors = "".join(f"{cell(row, f'error_lr{lr:g}')} ({cell(row, f'kept_lr{lr:g}')}) | " for lr in lrs)
        lines.append(
            f"| {row['method']} | {row['mode']} | {row['dtype']} | {row['drift']:.2g} | "
            f"{'yes' if row['bit_identical'] else 'no'} | {errors}{row['extra_memory']:.1%} |"
        )
    return "\n".join(lines)


def record(opts):
    """Run 100 LOZO steps on real SST-2 (the README's run, float32) and keep the projected gradients."""
    import os

    import run_lozo

    seen = []
    original = ZOOptimizer.set_projected_grad

    def recording(self, g):
        seen.append(g)
        original(self, g)

    ZOOptimizer.set_projected_grad = recording
    data_dir = os.environ.get("LOZO_DATA_DIR", str(REPO.parent / "shared" / "data"))
    argv = ["--task_name", "SST2", "--model_name", opts.model, "--data_dir", data_dir, "--trainer", "LOZO"]
    argv += ["--num_train", "1000", "--num_dev", "100", "--train_set_seed", "0"]
    argv += ["--per_device_train_batch_size", "8", "--learning_rate", "2e-5", "--zo_eps", str(EPS)]
    argv += ["--lr_scheduler_type", "constant", "--train_as_classification", "--max_steps", "100"]
    argv += ["--no_eval", "--output_dir", str(REPO / "result" / "train" / "half-precision-record")]
    argv += ["--report_to", "none"]
    if run_lozo.main(argv) != 0:
        sys.exit("error: the recording run failed")
    Path(opts.grads).parent.mkdir(parents=True, exist_ok=True)
    source = "SmolLM2-135M, SST-2 (train-set seed 0, batch 8), LOZO r 2, lr 2e-5, eps 1e-3, float32"
    Path(opts.grads).write_text(json.dumps({"source": source, "projected_grads": seen}, indent=1) + "\n")
    print(f"{len(seen)} projected gradients, mean |g| {sum(map(abs, seen)) / len(seen):.1f}: {opts.grads}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", choices=["measure", "drift", "record"], default="measure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M"))
    parser.add_argument("--layers", default="0,29", help="decoder layers whose tensors are replayed")
    parser.add_argument("--grads", default=str(GRADS), help="recorded projected gradients (JSON)")
    parser.add_argument("--out", default=str(REPO / "result" / "bench" / "half_precision.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: LOZO, LOZO-M, MeZO")
    parser.add_argument(
        "--lrs",
        default=",".join(f"{lr:g}" for lr in LRS),
        help="comma-separated learning rates of the update error",
    )
    parser.add_argument("--mezo_steps", type=int, default=1000, help="MeZO's longer replay (steps; 0: none)")
    parser.add_argument(
        "--modes", default="", help="comma-separated: default, compensated, master, in-place (all)"
    )
    opts = parser.parse_args()
    opts.lrs = [float(lr) for lr in opts.lrs.split(",")]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not Path(opts.model, "config.json").is_file():
        sys.exit(f"error: {opts.model} has no config.json; run: python utils.py prepare-model smollm2")
    if opts.command == "record":
        return record(opts)
    if not Path(opts.grads).is_file():
        sys.exit(f"error: no recorded gradients at {opts.grads}; run: python bench/half_precision.py record")
    report = measure(opts)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\n{opts.out}")


if __name__ == "__main__":
    main()
