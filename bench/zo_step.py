"""Cost of one training step against the floor of two forward passes, and its peak memory.

    python bench/zo_step.py --model models/SmolLM2-135M --batch 16 --seq 40 --dtype bfloat16
    python bench/zo_step.py --model shape:opt-125m --device cuda --dtype float16

Methods (--methods, comma-separated): forward, LOZO, LOZO-M, MeZO, MeZO-master, MeZO-in-place, LOZO-released,
MeZO-released, FT-AdamW, LOZO-r1, LOZO-r2, LOZO-r4, LOZO-r8; with --zo_batched_pair: LOZO-pair, LOZO-M-pair,
MeZO-pair; with --zo_queries 4: LOZO-q4, LOZO-pair-q4, MeZO-q4, MeZO-pair-q4 (with the pair, one forward of
the batch 8 times); forward-2B, one inference forward of the batch twice (what a one-direction pair's
forward computes); and MeZO-chunk20, MeZO with its dense noise and update in chunks of 2²⁰ numbers (a CPU's
chunk, which a GPU took for any model before its chunks grew with the model: zo_optimizer.noise_chunk).

Each method runs in a fresh process (so its peak memory is its own): after warm-up, the median of
--steps timed steps. "forward" is one forward pass computing the training loss on the batch in inference
mode, the unit the ZO methods are measured in (a ZO step needs two). LOZO, LOZO-M, MeZO (each module
perturbed for its own forward), MeZO-master (--zo_master_weights: a float32 master copy) and MeZO-in-place
(--zo_in_place) run the project's own step (LowRankTrainer.zo_training_step +
ZOOptimizer.step); the "-released" methods re-state the released code's formulation (out-of-place
`param.data = param.data + ...`, perturb, restore and update as separate passes); FT-AdamW is the stock
HF training step with AdamW. LOZO's steps are timed with merge_periods − 1 finished periods not yet
merged, the most a run carries (its side path is then at its widest and its factors at their largest);
"merge_s" is the pass that writes them into the weights, once every merge_periods·ν steps.
Every timed step is followed by one timed forward pass in the same process ("forward_s" of the method):
the ratio to two forwards divides by that, so a shared machine's load, which slows both, cancels out;
the top-level "forward_s" is the fresh "forward" process's own. For the project's ZO methods
"weight_passes_s" times the step without its forward passes (draw the directions, move to θ+εZ and
θ−εZ, update): what the method adds to two forwards besides the side path inside them, and
"weight_passes_ops" counts their operations (views and allocations aside: on a GPU, a kernel launch each
or more). MeZO's default step is also timed alternately with its in-place step in one process
("over_in_place"; the in-place step on a second copy of the model, loaded after the peak-memory sampling).
--profile adds one step of each method under torch.profiler ("profile": its top operations by self time,
with their calls: for MeZO the draws, aten::normal_).
Peak memory: the highest resident set size sampled during the timed steps (CPU), or
torch.cuda.max_memory_allocated (GPU).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import CountedOperations, paired, portable  # noqa: E402
from zo_optimizer import CHUNK, PAIR  # noqa: E402

SHAPES = {  # OPTConfig values of the released checkpoints; weights are random
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "opt-350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
}
METHODS = [
    "forward",
    *("LOZO", "LOZO-M", "MeZO", "MeZO-master", "MeZO-in-place"),
    *("LOZO-released", "MeZO-released", "FT-AdamW"),
]
METHODS += [f"LOZO-r{r}" for r in (1, 2, 4, 8)]
# --zo_batched_pair (the pair as one forward of 2B rows) and --zo_queries 4, and the unit they are held to:
# one inference forward of the batch twice.
METHODS += ["forward-2B", "LOZO-pair", "LOZO-M-pair", "MeZO-pair", "LOZO-q4", "LOZO-pair-q4", "MeZO-q4"]
METHODS += ["MeZO-pair-q4", "MeZO-chunk20"]
LR, EPS, SEED = 1e-6, 1e-3, 0


# ---------------------------------------------------------------------------------------------------------
# Worker: one method, one process


def load_model(spec, dtype, device):
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    if spec.startswith("shape:"):
        torch.manual_seed(SEED)
        config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SHAPES[spec.split(":", 1)[1]])
        with torch.device(device):  # initialised where it runs: a 1.3B model initialises slowly on a CPU
            return OPTForCausalLM(config).to(dtype=dtype), None
    from transformers import AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device), AutoTokenizer.from_pretrained(
        spec
    )


def real_batch(tokenizer, vocab_size, batch, seq, device):
    """batch × seq ids of real SST-2 sentences (random ids for a shape-only model), the last id the option."""
    ids = []
    if tokenizer is not None:
        import tasks

        data_dir = os.environ.get("LOZO_DATA_DIR", str(REPO.parent / "shared" / "data"))
        sentences = [
            s.data["sentence"] for s in tasks.get_task("SST2", data_dir).samples["train"][: 40 * batch]
        ]
        stream = tokenizer.encode(" ".join(sentences), add_special_tokens=False)
        ids = [stream[i * seq : (i + 1) * seq] for i in range(batch)]
    else:
        generator = torch.Generator().manual_seed(SEED)
        ids = torch.randint(4, vocab_size, (batch, seq), generator=generator).tolist()
    input_ids = torch.tensor(ids, device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "option_len": torch.ones(batch, dtype=torch.long, device=device),
    }


def make_trainer(model, tokenizer, method, batch, output_dir):
    import run_lozo
    from LOZOtrainer import LowRankTrainer

    method, pair, queries = method.removesuffix("-q4"), "-pair" in method, 4 if method.endswith("-q4") else 1
    method = method.removesuffix("-pair")
    zo = {"MeZO", "MeZO-master", "MeZO-in-place", "MeZO-chunk20"}
    trainer_name = "zo" if method in zo else "regular" if method == "FT-AdamW" else "LOZO"
    argv = ["--output_dir", output_dir, "--trainer", trainer_name, "--learning_rate", str(LR)]
    argv += ["--zo_eps", str(EPS), "--train_set_seed", "0", "--per_device_train_batch_size", str(batch)]
    if method == "LOZO-M":
        argv += ["--lozo_optimizer", "sgdm"]
    if method == "MeZO-in-place":
        argv += ["--zo_in_place"]
    if method == "MeZO-master":
        argv += ["--zo_master_weights"]
    if method.startswith("LOZO-r"):
        argv += ["--rank_r", method.removeprefix("LOZO-r")]
    argv += ["--zo_batched_pair"] * pair + ["--zo_queries", str(queries)]
    if model.device.type == "cpu":
        argv += ["--use_cpu"]
    args = run_lozo.parse_args(argv)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 1
    processing = type("Pad", (), {"pad_token_id": pad})()
    trainer = LowRankTrainer(model=model, args=args, train_dataset=[{}], processing_class=processing)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    if method == "MeZO-chunk20":
        trainer.zo_optimizer.chunk = CHUNK
    return trainer


def released_step(model, loss_fn, low_rank, step, v_factors, rank=2, step_interval=50):
    """The released code's formulation, for reference: out-of-place updates, seeded global RNG,
    perturb / restore / update as separate passes over the weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if low_rank and step % step_interval == 0:
        for i, p in enumerate(params):
            if p.dim() == 2:
                v_factors[i] = torch.randn(p.shape[1], rank, device=p.device, dtype=p.dtype)

    def direction(p, i):
        if low_rank and p.dim() == 2:
            return torch.randn(p.shape[0], rank, device=p.device, dtype=p.dtype) @ v_factors[i].T
        return torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)

    def perturb(scale):
        torch.manual_seed(step)
        for i, p in enumerate(params):
            p.data = p.data + scale * EPS * direction(p, i)

    with torch.no_grad():
        perturb(+1)
        loss_plus = loss_fn()
        perturb(-2)
        loss_minus = loss_fn()
        perturb(+1)
        g = (loss_plus - loss_minus).item() / (2 * EPS)
        torch.manual_seed(step)
        for i, p in enumerate(params):
            p.data = p.data - LR * (g * direction(p, i))


class PeakMemory:
    """Highest resident set size (CPU) or allocated memory (GPU) while active, in MB."""

    def __init__(self, device):
        self.device, self.peak, self._running = device, 0, False

    @staticmethod
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.002)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, self.rss_mb())


def run_worker(opts):
    from utils import model_option_loss

    torch.set_num_threads(opts.threads or torch.get_num_threads())
    dtype = getattr(torch, opts.dtype)
    model, tokenizer = load_model(opts.model, dtype, opts.device)
    model.eval()
    batch = real_batch(tokenizer, model.config.vocab_size, opts.batch, opts.seq, opts.device)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 1

    def loss():
        return model_option_loss(model, batch, pad)

    def reference_forward(inputs=None):  # the unit, measured beside each step: a busy shared machine slows
        # both alike
        paths = [getattr(optimizer, name, None) for name in ("side_path", "dense_path")]
        paths = [path for path in paths if path is not None]
        for path in paths:  # the plain model's forward, without LOZO's side path or MeZO's swaps
            path.remove()
        training = model.training
        model.eval()
        with torch.inference_mode():
            model_option_loss(model, inputs or batch, pad)
        model.train(training)
        for path in paths:
            path.install()

    method, step, weight_passes, optimizer = opts.worker, 0, None, None
    if method == "forward":
        run_step = reference_forward
    elif method == "forward-2B":  # one forward of the batch twice: a one-direction batched pair's forward
        twice = paired(batch, 2)

        def run_step():
            reference_forward(twice)

    elif method.endswith("-released"):
        v_factors = {}

        def run_step():
            nonlocal step
            released_step(model, loss, method.startswith("LOZO"), step, v_factors)
            step += 1

    else:
        trainer = make_trainer(model, tokenizer, method, opts.batch, tempfile.mkdtemp())
        if method == "FT-AdamW":
            model.train()

            def run_step():
                trainer.training_step(model, batch)
                trainer.optimizer.step()
                model.zero_grad(set_to_none=True)

        else:
            optimizer = trainer.zo_optimizer

            def run_step():
                trainer.zo_training_step(model, batch)
                optimizer.step()

            def weight_passes(g=0.0):  # the step without its forward passes: what the method itself costs
                optimizer.begin_step()
                if optimizer.pair is not None:  # (its perturbed copies are built in the forward)
                    optimizer.move_to(PAIR)
                for query in range(optimizer.queries) if optimizer.pair is None else ():
                    if query:
                        optimizer.begin_query(query)
                    optimizer.move_to(+1)
                    optimizer.move_to(-1)
                optimizer.set_projected_grad(g if optimizer.queries == 1 else [g] * optimizer.queries)
                optimizer.step()

            if optimizer.matrices:  # LOZO: time the steps with the most unmerged periods a run carries
                interval, optimizer.step_interval = optimizer.step_interval, 1
                for _ in range(optimizer.merge_periods):  # step 0's period, then 7 finished ones
                    weight_passes(g=1.0)
                optimizer.step_interval = interval

    def synchronized():
        if opts.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(opts.warmup):
        run_step()
    synchronized()

    step_times, forward_times = [], []
    with PeakMemory(opts.device) as memory:  # a forward's peak never exceeds a training step's
        for _ in range(opts.steps):
            step_times.append(timed(run_step, synchronized))
            forward_times.append(timed(reference_forward, synchronized))
    result = {
        "step_s": statistics.median(step_times),
        "forward_s": statistics.median(forward_times),
        "peak_mem_mb": memory.peak,
    }
    if optimizer is not None and trainer.args.zo_batched_pair:
        result |= alternated_with_two_passes(trainer, run_step, reference_forward, batch, opts, synchronized)
    if method == "MeZO":
        result |= alternated_with_in_place(run_step, batch, opts, synchronized)
    if weight_passes is not None:
        result["weight_passes_s"] = statistics.median(
            timed(weight_passes, synchronized) for _ in range(opts.steps)
        )
        with CountedOperations() as counted:
            weight_passes()
        result["weight_passes_ops"] = len(counted.names)
    if opts.profile:
        result["profile"] = profile_step(run_step, synchronized)
    if optimizer is not None and optimizer.matrices:  # one pass writing all unmerged periods into the weights
        result["merge_s"] = timed(optimizer.settle, synchronized)
        result["merge_every_steps"] = optimizer.merge_periods * optimizer.step_interval
    print(json.dumps(result))


def alternated_with_two_passes(trainer, run_step, reference_forward, batch, opts, synchronized):
    """A batched-pair method's step, the same step in two passes per direction and one inference forward of
    what the pair's forward computes (the batch twice per direction), timed in turn in one process (what
    the pair saves is a few percent: a shared machine's drift would hide it)."""
    twice = paired(batch, 2 * trainer.zo_optimizer.queries)

    def two_passes():
        trainer.args.zo_batched_pair = False
        try:
            run_step()
        finally:
            trainer.args.zo_batched_pair = True

    medians = alternated(
        {"pair_s": run_step, "two_passes_s": two_passes, "forward_2B_s": lambda: reference_forward(twice)},
        opts.steps,
        synchronized,
    )
    return {
        "alternated": medians,
        "pair_over_two_passes": medians["pair_s"] / medians["two_passes_s"],
        "pair_over_forward_2B": medians["pair_s"] / medians["forward_2B_s"],
    }


def alternated_with_in_place(run_step, batch, opts, synchronized):
    """MeZO's default step and its in-place step (`--zo_in_place`, on a second copy of the model), timed in
    turn in one process: the issue's "no slower than in place" is a difference of a few percent, which a
    shared machine's drift between processes hides."""
    model, tokenizer = load_model(opts.model, getattr(torch, opts.dtype), opts.device)
    model.eval()
    trainer = make_trainer(model, tokenizer, "MeZO-in-place", opts.batch, tempfile.mkdtemp())

    def in_place():
        trainer.zo_training_step(model, batch)
        trainer.zo_optimizer.step()

    in_place()  # warm-up
    medians = alternated({"default_s": run_step, "in_place_s": in_place}, opts.steps, synchronized)
    return {"alternated": medians, "over_in_place": medians["default_s"] / medians["in_place_s"]}


def alternated(functions, steps, synchronized):
    """{name: median seconds} of `functions` ({name: function}), timed in turn `steps` times each."""
    times = {name: [] for name in functions}
    for _ in range(steps):
        for name, function in functions.items():
            times[name].append(timed(function, synchronized))
    return {name: statistics.median(values) for name, values in times.items()}


def profile_step(run_step, synchronized, top=8):
    """One step under torch.profiler: its `top` operations by self time (CPU time: what a CPU computes, and
    what a GPU's host spends launching), with their calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run_step()
        synchronized()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return {event.key: {"calls": event.count, "self_s": event.self_cpu_time_total / 1e6} for event in events}


def timed(function, synchronized):
    start = time.perf_counter()
    function()
    synchronized()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Parent: every method in its own process, then the table, the JSON and the chart


def measure(opts, method):
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--model",
        opts.model,
        "--batch",
        str(opts.batch),
    ]
    command += ["--seq", str(opts.seq), "--device", opts.device, "--dtype", opts.dtype]
    command += ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--threads", str(opts.threads)]
    command += ["--profile"] * opts.profile
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {method:14s} {result['step_s']:.3f} s  {result['peak_mem_mb']:.0f} MB", file=sys.stderr)
    return result


def table(report):
    rows = [
        "| method | step (s) | × two forwards | weight passes alone (s) | merge (s) | peak memory (MB) "
        "| × inference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        passes = f"{m['weight_passes_s']:.3f}" if "weight_passes_s" in m else "—"
        merge = f"{m['merge_s']:.2f} every {m['merge_every_steps']} steps" if "merge_s" in m else "—"
        rows.append(
            f"| {name} | {m['step_s']:.3f} | {m['ratio_to_two_forwards']:.2f} | {passes} | {merge} | "
            f"{m['peak_mem_mb']:.0f} | {m['mem_ratio_to_inference']:.2f} |"
        )
    return "\n".join(rows)


def chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["methods"] if n != "forward"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, key, label, floor in [
        (axes[0], "ratio_to_two_forwards", "step time / two forward passes", 1.0),
        (axes[1], "mem_ratio_to_inference", "peak memory / inference peak", 1.0),
    ]:
        axis.bar(names, [report["methods"][n][key] for n in names], color="tab:blue")
        axis.axhline(floor, color="k", linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=60)
    shape = f"batch {report['batch']}×{report['seq']}"
    figure.suptitle(f"{report['model']} · {report['device']} · {report['dtype']} · {shape}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shapes = ", ".join("shape:" + name for name in SHAPES)
    parser.add_argument("--model", required=True, help=f"a checkpoint folder or one of {shapes}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one step a method: its top operations and calls"
    )
    parser.add_argument("--out", help="JSON report (default result/bench/<model>-<device>-<dtype>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.model.startswith("shape:") and opts.model.split(":", 1)[1] not in SHAPES:
        sys.exit(f"error: unknown shape {opts.model}; use one of: {', '.join('shape:' + s for s in SHAPES)}")
    if not opts.model.startswith("shape:") and not Path(opts.model, "config.json").is_file():
        sys.exit(f"error: {opts.model} has no config.json; give a checkpoint folder or a shape:NAME")
    unknown = [m for m in opts.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown method {unknown[0]}; use some of: {', '.join(METHODS)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible; use --device cpu")
    if opts.worker:
        return run_worker(opts)

    name = opts.model.removeprefix("shape:").rstrip("/").split("/")[-1]
    out = Path(opts.out or REPO / "result" / "bench" / f"{name}-{opts.device}-{opts.dtype}.json")
    print(f"{opts.model}: batch {opts.batch}×{opts.seq}, {opts.device}, {opts.dtype}", file=sys.stderr)
    measured = {method: measure(opts, method) for method in opts.methods.split(",")}
    forward = measured["forward"]
    report = {
        "model": portable(opts.model),
        "device": opts.device,
        "dtype": opts.dtype,
        "batch": opts.batch,
        "seq": opts.seq,
        "forward_s": forward["step_s"],
        "inference_peak_mem_mb": forward["peak_mem_mb"],
        "torch_threads": opts.threads or torch.get_num_threads(),
        "methods": {
            method: m
            | {
                "ratio_to_two_forwards": m["step_s"] / (2 * m["forward_s"]),
                "mem_ratio_to_inference": m["peak_mem_mb"] / forward["peak_mem_mb"],
            }
            for method, m in measured.items()
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    chart(report, out.with_suffix(".png"))
    print(table(report))
    for name, m in report["methods"].items():
        if "over_in_place" in m:
            print(f"{name}, alternated in one process with its in-place step: {m['over_in_place']:.2f} × it")
        for op, cost in m.get("profile", {}).items():
            print(f"{name}, one step profiled: {op} {cost['calls']} calls, {cost['self_s']:.3f} s")
        if "pair_over_two_passes" in m:
            print(
                f"{name}, alternated in one process: {m['pair_over_two_passes']:.2f} × its two-pass step, "
                f"{m['pair_over_forward_2B']:.2f} × one inference forward of its rows (2B a direction)"
            )
    print(f"\n{out}\n{out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
