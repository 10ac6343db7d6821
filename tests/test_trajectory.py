"""Trajectory checkpoints (--zo_trajectory_checkpoints): a zeroth-order checkpoint that holds the steps (seed
settings, each step's g and learning rates) instead of the weights. Saving one must not touch the run, and
resuming from one must give the weights of the run that was never stopped, bit for bit, in half precision
and at the learning rates users run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_lozo
from LOZOtrainer import TRAJECTORY_NAME, ZOOptimizer, checkpoint_problem
from utils import UsageError

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
METHODS = {
    # V redrawn every 2 steps and merged at every redraw: the replay must round where the run rounded.
    "LOZO": ["--trainer", "LOZO", "--step_interval", "2", "--merge_periods", "1"],
    "LOZO-M": [
        "--trainer",
        "LOZO",
        "--lozo_optimizer",
        "sgdm",
        "--step_interval",
        "2",
        "--merge_periods",
        "1",
    ],
    "MeZO": ["--trainer", "zo"],
    "MeZO-in-place": ["--trainer", "zo", "--zo_in_place"],  # every perturbation rounds: replayed too
    "MeZO-q2": ["--trainer", "zo", "--zo_queries", "2"],
}
# several directions a step (their g's recorded), evaluated as batched pairs
METHODS["LOZO-M-pair-q3"] = [*METHODS["LOZO-M"], "--zo_batched_pair", "--zo_queries", "3"]


def command(tiny_opt_dir, data_dir, out, method, *extra):
    return [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "24", "--train_set_seed", "0", "--per_device_train_batch_size", "4",
        "--train_as_classification", "--load_bfloat16", "--learning_rate", "1e-6", "--zo_eps", "1e-3",
        "--lr_scheduler_type", "linear", "--max_steps", str(STEPS), "--save_model", "--no_eval",
        "--report_to", "none", "--output_dir", str(out), *METHODS[method], *extra,
    ]  # fmt: skip


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", list(METHODS))
def test_trajectory_checkpoints_leave_the_run_alone_and_resume_bit_for_bit(
    method, tiny_opt_dir, data_dir, tmp_path
):
    plain, saved, resumed = tmp_path / "plain", tmp_path / "saved", tmp_path / "resumed"
    assert run_lozo.main(command(tiny_opt_dir, data_dir, plain, method)) == 0
    every_2 = ["--zo_trajectory_checkpoints", "--save_strategy", "steps", "--save_steps", "2"]
    assert run_lozo.main(command(tiny_opt_dir, data_dir, saved, method, *every_2)) == 0

    checkpoint = saved / "checkpoint-4"
    assert checkpoint_problem(checkpoint) is None
    assert not list(checkpoint.glob("*.safetensors")) and not (checkpoint / "optimizer.pt").exists()
    assert sum(f.stat().st_size for f in checkpoint.iterdir()) < 64_000
    record = json.loads((checkpoint / TRAJECTORY_NAME).read_text())
    lrs = [lr for _, (lr, *_) in record["steps"]]
    assert lrs[0] == 1e-6 and len(set(lrs)) == 4 and lrs == sorted(lrs, reverse=True)  # the linear decay

    # A fresh process, the starting model, the steps of checkpoint-4: the last two steps run for real.
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = command(
        tiny_opt_dir, data_dir, resumed, method, *every_2, "--resume_from_checkpoint", str(checkpoint)
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "run_lozo.py"), *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replaying 4 zeroth-order steps" in done.stderr
    assert "differs from the checkpoint" not in done.stderr  # the replay arrived where the run was

    start = load_file(next(Path(tiny_opt_dir).glob("*.safetensors")))
    final = weights(plain)
    assert any(not torch.equal(final[k], start[k].to(final[k].dtype)) for k in final)  # lr 1e-6 moved some
    assert_same(weights(saved), final)  # saving steps changed nothing (a full checkpoint merges first)
    assert_same(weights(resumed), final)
    assert json.loads((resumed / "checkpoint-6" / TRAJECTORY_NAME).read_text()) == json.loads(
        (saved / "checkpoint-6" / TRAJECTORY_NAME).read_text()
    )


def stepped(weight, grads, settle_at=(), **settings):
    optimizer = ZOOptimizer([weight], lr=0.1, seed=3, low_rank=True, rank=2, replayable=True, **settings)
    for g in grads:
        if optimizer.zo_step in settle_at:
            optimizer.settle()  # as a full checkpoint does: a merge, rounded
        optimizer.begin_step()
        optimizer.set_projected_grad(g)
        optimizer.step()
    return optimizer


def test_replay_retakes_skipped_steps_and_merges_and_checks_the_settings_and_the_start(caplog):
    start = torch.randn(64, 48, dtype=torch.bfloat16)
    grads = [1.0, float("nan"), -2.0, 0.5, 3.0]
    run = stepped(torch.nn.Parameter(start.clone()), grads, settle_at=(3,), step_interval=2)
    run.settle()
    record = json.loads(json.dumps(run.record()))  # through JSON, as a checkpoint holds it
    assert math.isnan(record["steps"][1][0]) and record["settled_at"] == [3, 5]

    def fresh(weights, seed=3, weight_decay=0.0):
        settings = dict(low_rank=True, step_interval=2, weight_decay=weight_decay)
        return ZOOptimizer([torch.nn.Parameter(weights)], lr=0.1, seed=seed, **settings)

    again = fresh(start.clone())
    again.replay(record)
    assert again.zo_step == 5 and again.skipped == 1
    assert not torch.equal(run.tensors[0][1], start)
    assert torch.equal(again.tensors[0][1], run.tensors[0][1])  # the stochastic roundings, bit for bit
    with pytest.raises(UsageError, match="other weights"):
        fresh(start + 1).replay(record)
    with pytest.raises(UsageError, match="'seed': \\(3, 4\\)"):
        fresh(start.clone(), seed=4).replay(record)
    with pytest.raises(UsageError, match="'weight_decay': \\(\\[0.0\\], \\[0.1\\]\\)"):
        fresh(start.clone(), weight_decay=0.1).replay(record)
    with pytest.raises(UsageError, match="drawn elsewhere .*'device': \\('cuda', 'cpu'\\)"):
        fresh(start.clone()).replay(record | {"device": "cuda"})  # a CUDA generator draws other numbers
    with pytest.raises(UsageError, match="drawn elsewhere .*'tensors'"):
        fresh(start.clone()).replay(record | {"tensors": "other names or shapes"})
    with pytest.raises(UsageError, match="drawn elsewhere .*'noise_chunk': \\(16777216, 1048576\\)"):
        fresh(start.clone()).replay(record | {"noise_chunk": 1 << 24})  # a GPU's draws depend on the chunks
    older = {k: v for k, v in record.items() if k != "noise_chunk"}  # written when every chunk was 2²⁰
    fresh(start.clone()).replay(older)
    assert "differs from the checkpoint" not in caplog.text
    fresh(start.clone()).replay(record | {"digest": "another state"})
    assert "differs from the checkpoint's in its last bits" in caplog.text


def test_a_run_that_began_without_a_record_cannot_save_one():
    run = stepped(torch.nn.Parameter(torch.randn(6, 5)), [1.0])
    state = run.state_dict()
    del state["zo"]["trajectory"]  # a checkpoint written before steps were recorded
    resumed = ZOOptimizer([run.tensors[0][1]], lr=0.1, seed=3, low_rank=True, rank=2, replayable=True)
    resumed.load_state_dict(state)
    resumed.begin_step()
    resumed.set_projected_grad(1.0)
    resumed.step()  # it trains on
    with pytest.raises(UsageError, match="full checkpoints"):
        resumed.record()


def test_a_trajectory_checkpoint_missing_a_file_is_named(tiny_opt_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    extra = [
        "--zo_trajectory_checkpoints",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--max_steps",
        "2",
    ]
    assert run_lozo.main(command(tiny_opt_dir, data_dir, out, "LOZO", *extra)) == 0
    checkpoint = out / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "scheduler.pt").unlink()
    assert checkpoint_problem(checkpoint) == "scheduler.pt is missing"
    (checkpoint / TRAJECTORY_NAME).write_text('{"steps": [')
    assert checkpoint_problem(checkpoint) == f"{TRAJECTORY_NAME} is damaged"
