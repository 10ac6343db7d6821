"""Crash-safe training: checkpoints appear only when complete, `--resume_from_checkpoint last` picks the
newest complete one (or starts afresh), and a run killed at random moments and restarted with the same
command ends with the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from LOZOtrainer import STAGING_DIR, checkpoint_problem

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "LOZO": ["--trainer", "LOZO", "--step_interval", "3", "--merge_periods", "2"],
    "LOZO-M": ["--trainer", "LOZO", "--lozo_optimizer", "sgdm", "--step_interval", "3"],
    "MeZO": ["--trainer", "zo"],
    "FT": ["--trainer", "regular", "--learning_rate", "1e-3"],
}
# Checkpoints of the steps alone: a restart replays them onto the starting weights.
# (MeZO's and LOZO-M's replays are tested in test_trajectory.py.)
METHODS["LOZO-steps"] = [*METHODS["LOZO"], "--zo_trajectory_checkpoints"]
STEPS = 16


def command(tiny_opt_dir, data_dir, out, method, *extra):
    """The re-submittable command: bf16 weights (the float32 masters must come back from the checkpoint
    too), a checkpoint every step, two kept."""
    return [
        sys.executable, str(REPO / "run_lozo.py"),
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "24", "--train_set_seed", "0", "--per_device_train_batch_size", "4",
        "--train_as_classification", "--learning_rate", "1e-2", "--lr_scheduler_type", "linear",
        "--max_steps", str(STEPS), "--load_bfloat16", "--save_strategy", "steps", "--save_steps", "1",
        "--save_total_limit", "2", "--save_model", "--no_eval", "--report_to", "none",
        "--output_dir", str(out), "--resume_from_checkpoint", "last", *METHODS[method], *extra,
    ]  # fmt: skip


def newest_step(out):
    steps = [int(p.name.split("-")[-1]) for p in Path(out).glob("checkpoint-*") if p.name[11:].isdigit()]
    return max(steps, default=0)


def same_weights(a, b):
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def uninterrupted(tiny_opt_dir, data_dir, tmp_path_factory):
    """A method's weights after a run nobody interrupted (the same command, `extra` arguments added)."""
    cache = {}

    def weights(method, *extra):
        if (method, extra) not in cache:
            out = tmp_path_factory.mktemp(f"straight-{method}")
            argv = command(tiny_opt_dir, data_dir, out, method, *extra)
            done = subprocess.run(argv, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            cache[method, extra] = out / "model.safetensors"
        return cache[method, extra]

    return weights


def kill_at_a_random_moment(argv, out, chance):
    """Start an attempt, let it save two checkpoints of its own, then SIGKILL it at a random moment of
    its next step (a save takes most of a step here, so kills land inside checkpoint writes too). Timed in
    steps, not seconds: on any machine an attempt goes about three steps further, never to the end."""
    step = newest_step(out)
    seen_at = []  # when each new checkpoint of this attempt appeared
    attempt = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while attempt.poll() is None and len(seen_at) < 2 and time.monotonic() < deadline:
        newest = newest_step(out)
        if newest != step:
            step = newest
            seen_at.append(time.monotonic())
        time.sleep(0.002)
    if len(seen_at) == 2:
        time.sleep(chance.uniform(0, seen_at[1] - seen_at[0]))
    attempt.kill()
    attempt.wait()


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_at_random_moments_and_restarted_ends_with_the_same_weights(
    method, uninterrupted, tiny_opt_dir, data_dir, tmp_path
):
    """SIGKILL three times at random moments, then let the same command finish."""
    chance = random.Random(method)
    argv = command(tiny_opt_dir, data_dir, tmp_path, method)
    for _ in range(3):
        kill_at_a_random_moment(argv, tmp_path, chance)
        assert newest_step(tmp_path) < STEPS, "the run finished before it could be killed"
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for checkpoint in tmp_path.glob("checkpoint-*"):  # whatever the kills hit, the named ones are whole
        assert checkpoint_problem(checkpoint) is None, checkpoint
    assert same_weights(tmp_path / "model.safetensors", uninterrupted(method))


KILL_DURING_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import LOZOtrainer

original = LOZOtrainer.LowRankTrainer._save_optimizer_and_scheduler

def save_then_die(self, output_dir):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)  # the model of checkpoint-{step} is written, the rest not
    original(self, output_dir)

LOZOtrainer.LowRankTrainer._save_optimizer_and_scheduler = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_kill_inside_a_checkpoint_write_leaves_no_checkpoint_of_that_step(
    uninterrupted, tiny_opt_dir, data_dir, tmp_path
):
    wrapper = tmp_path / "die_in_save.py"
    wrapper.write_text(KILL_DURING_SAVE.format(repo=str(REPO), step=5))
    argv = command(tiny_opt_dir, data_dir, tmp_path / "out", "LOZO")
    killed = subprocess.run([sys.executable, str(wrapper), *argv[1:]], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert (out / STAGING_DIR / "checkpoint-5" / "model.safetensors").is_file()  # half-written, aside
    assert not (out / "checkpoint-5").exists() and newest_step(out) == 4
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in done.stderr
    assert same_weights(out / "model.safetensors", uninterrupted("LOZO"))


def test_last_skips_damaged_checkpoints_and_an_explicit_damaged_one_is_a_one_line_error(
    uninterrupted, tiny_opt_dir, data_dir, tmp_path
):
    """What a non-atomic writer leaves after a kill: checkpoint-16 without trainer_state.json and
    optimizer.pt; checkpoint-15 with a truncated optimizer.pt. `last` resumes from checkpoint-14 and ends
    where the uninterrupted run ends."""
    argv = command(tiny_opt_dir, data_dir, tmp_path, "LOZO")
    argv[argv.index("--save_total_limit") + 1] = "3"
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    os.remove(tmp_path / "checkpoint-16" / "trainer_state.json")
    os.remove(tmp_path / "checkpoint-16" / "optimizer.pt")
    optimizer = tmp_path / "checkpoint-15" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    os.remove(tmp_path / "model.safetensors")

    explicit = [*argv]
    explicit[explicit.index("--resume_from_checkpoint") + 1] = str(tmp_path / "checkpoint-16")
    refused = subprocess.run(explicit, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {tmp_path / 'checkpoint-16'}: trainer_state.json is missing; "
        "give a complete checkpoint folder, or `last` for the newest complete one in --output_dir"
    )
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping checkpoint {tmp_path / 'checkpoint-16'}: trainer_state.json is missing" in done.stderr
    assert f"skipping checkpoint {tmp_path / 'checkpoint-15'}: optimizer.pt is damaged" in done.stderr
    assert f"resuming from {tmp_path / 'checkpoint-14'}" in done.stderr
    assert same_weights(tmp_path / "model.safetensors", uninterrupted("LOZO"))
    assert checkpoint_problem(tmp_path / "checkpoint-16") is None  # written again, whole


def test_last_without_a_checkpoint_starts_from_the_beginning(uninterrupted, tiny_opt_dir, data_dir, tmp_path):
    done = subprocess.run(command(tiny_opt_dir, data_dir, tmp_path, "MeZO"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no complete checkpoint in {tmp_path}: starting from the beginning" in done.stderr
    assert same_weights(tmp_path / "model.safetensors", uninterrupted("MeZO"))


SIGTERM_AT_STEP = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import LOZOtrainer
from transformers import TrainerCallback

class Preempt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before the kill

original = LOZOtrainer.LowRankTrainer.__init__

def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.add_callback(Preempt())

LOZOtrainer.LowRankTrainer.__init__ = init
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Checkpoints only at SIGTERM for MeZO and first-order training. A LOZO checkpoint writes the unmerged
# low-rank factors into the weights (one rounding), so a LOZO run resumes bit for bit when its checkpoints
# fall on the same steps as the uninterrupted run's: here every 3 steps, and SIGTERM in step 3.
PREEMPTED = {
    "MeZO": ("--save_strategy", "no"),
    "FT": ("--save_strategy", "no"),
    "LOZO-M": ("--save_steps", "3"),
}


@pytest.mark.parametrize("method", list(PREEMPTED))
def test_sigterm_checkpoints_after_the_step_exits_0_and_the_run_resumes(
    method, uninterrupted, tiny_opt_dir, data_dir, tmp_path
):
    """--save_on_interrupt: SIGTERM during step 3 → checkpoint-3, exit 0, no result and no final model
    (the run is not finished); the same command then completes it, to the uninterrupted run's weights."""
    wrapper = tmp_path / "preempt.py"
    wrapper.write_text(SIGTERM_AT_STEP.format(repo=str(REPO), step=2))
    out = tmp_path / "out"
    argv = command(tiny_opt_dir, data_dir, out, method, "--save_on_interrupt", *PREEMPTED[method])
    stopped = subprocess.run(
        [sys.executable, str(wrapper), *argv[1:], "--result_file", str(out / "r.json")],
        capture_output=True,
        text=True,
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM received" in stopped.stderr and "--resume_from_checkpoint last" in stopped.stderr
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert checkpoint_problem(out / "checkpoint-3") is None
    assert not (out / "model.safetensors").exists() and not (out / "r.json").exists()
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-3'}" in done.stderr
    assert same_weights(
        out / "model.safetensors", uninterrupted(method, "--save_on_interrupt", *PREEMPTED[method])
    )
