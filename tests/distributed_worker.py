"""Runs `run_lozo.main` in each process that torchrun starts (tests/test_distributed.py), recording what
crosses the process group and each rank's trained weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT RUNS.json

runs each {name: {"argv": [run_lozo arguments], "interrupt_rank": r (optional)}} of RUNS.json in turn (one
launch, several runs: starting processes is the slow part) and writes OUT/<name>/rank<r>.pt (weights) and
OUT/<name>/rank<r>.json (the collectives called, by phase; how the trainer held the model; what this rank
predicted and wrote). Imported by the tests, `train_and_record` runs the same path in one process.
"""

import functools
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_lozo  # noqa: E402

# Every tensor-level collective of torch.distributed (the object ones, like all_gather_object, call these),
# and the bulk broadcast DistributedDataParallel uses to synchronise replicas when it wraps a model.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
    "_broadcast_coalesced",
)


class Recorder(TrainerCallback):
    """Labels each collective with the phase it happened in: `step<n>` inside optimisation step n (from
    on_step_begin to on_step_end), `train` elsewhere in training, `outside` before and after it."""

    def __init__(self):
        self.phase, self.calls = "outside", []

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "train"

    def on_step_begin(self, args, state, control, **kwargs):
        self.phase = f"step{state.global_step}"

    def on_step_end(self, args, state, control, **kwargs):
        self.phase = "train"

    def on_train_end(self, args, state, control, **kwargs):
        self.phase = "outside"

    def record(self, name, args):
        tensors = [t for a in args for t in (a if isinstance(a, list | tuple) else [a]) if torch.is_tensor(t)]
        self.calls.append(
            {
                "phase": self.phase,
                "op": name,
                "numel": sum(t.numel() for t in tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
                "dtypes": sorted({str(t.dtype) for t in tensors}),
            }
        )


RECORDER = [Recorder()]  # the current run's


def install_recording():
    def wrap(name, function):
        @functools.wraps(function)
        def recorded(*args, **kwargs):
            RECORDER[0].record(name, args)
            return function(*args, **kwargs)

        return recorded

    for name in COLLECTIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, wrap(name, getattr(module, name)))


class InterruptOneRank(TrainerCallback):
    """Sends SIGTERM to this process at the start of step 1 if it is rank `rank`, and to no other."""

    def __init__(self, rank):
        self.rank = rank

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def counting(counts, key, function):
    def counted(*args, **kwargs):
        counts[key] = counts.get(key, 0) + 1
        return function(*args, **kwargs)

    return counted


def train_and_record(argv, out, interrupt_rank=None):
    """`run_lozo.main(argv)`, keeping the trainer: writes the weights and the record under `out`.
    Also counts the samples this rank predicted and the result files it wrote, and keeps the predictions
    that metrics were computed from."""
    recorder, kept, counts, predictions = Recorder(), {}, {}, []
    RECORDER[0] = recorder
    originals = {name: getattr(run_lozo, name) for name in ("write_metrics_to_file", "calculate_metric")}
    original_predict = run_lozo.Framework.best_candidate  # once a classified sample, batched or not
    run_lozo.Framework.best_candidate = counting(counts, "predicted", original_predict)
    run_lozo.write_metrics_to_file = counting(counts, "results_written", originals["write_metrics_to_file"])

    def calculate_metric(found, metric):
        predictions.append([[p.correct_candidate, p.predicted_candidate] for p in found])
        return originals["calculate_metric"](found, metric)

    run_lozo.calculate_metric = calculate_metric
    original_train = run_lozo.Framework.train

    def train(self, train_samples, dev_samples):
        original_init = run_lozo.LowRankTrainer.__init__

        def init(trainer, *args, **kwargs):
            original_init(trainer, *args, **kwargs)
            trainer.add_callback(recorder)
            if interrupt_rank is not None:
                trainer.add_callback(InterruptOneRank(interrupt_rank))

        run_lozo.LowRankTrainer.__init__ = init
        try:
            kept["trainer"] = original_train(self, train_samples, dev_samples)
        finally:
            run_lozo.LowRankTrainer.__init__ = original_init
        return kept["trainer"]

    run_lozo.Framework.train = train
    try:
        code = run_lozo.main(argv)
    finally:
        run_lozo.Framework.train, run_lozo.Framework.best_candidate = original_train, original_predict
        for name, function in originals.items():
            setattr(run_lozo, name, function)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"exit_code": code, "calls": recorder.calls, "predictions": predictions, **counts}
    trainer = kept.get("trainer")
    if trainer is not None:
        torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters()}, out / f"rank{rank}.pt")
        record["model_wrapped"] = type(trainer.model_wrapped).__name__
        record["world_size"] = trainer.args.world_size
        record["global_step"] = trainer.state.global_step
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    install_recording()
    for name, run in runs.items():
        train_and_record(run["argv"], out / name, run.get("interrupt_rank"))
