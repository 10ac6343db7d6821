"""Crash safety: checkpoints that are complete or absent, and a clean stop on the signals schedulers send."""

import json
import logging
import os
import signal
import zipfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


class SaveOnInterruptCallback(TrainerCallback):
    """On SIGTERM or SIGUSR1 (what schedulers send before they kill or preempt a job): checkpoint after the
    step in progress and stop. The handlers are installed for the training loop only."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.interrupted = False
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        logger.warning(
            "%s received: saving a checkpoint after this step and stopping", signal.Signals(signum).name
        )
        self.interrupted = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted_anywhere(args):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def interrupted_anywhere(self, args):
        """Under torchrun the signal may reach some ranks only; all must stop after the same step (else the
        others wait forever in the next all-reduce): one more number per step, with --save_on_interrupt."""
        if args.world_size == 1:
            return self.interrupted
        flag = torch.tensor([float(self.interrupted)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---- checkpoints that are complete or absent ----

STAGING_DIR = ".incomplete"  # <output_dir>/.incomplete/checkpoint-N: a checkpoint being written
TRAJECTORY_NAME = "zo_trajectory.json"  # a zeroth-order run's steps, in place of weights and optimizer


def holds_steps(checkpoint):
    """Whether a checkpoint folder records steps (--zo_trajectory_checkpoints) instead of weights."""
    return os.path.isfile(os.path.join(checkpoint, TRAJECTORY_NAME))


MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
)


def checkpoint_problem(folder, with_optimizer=True):
    """Why `folder` cannot be resumed from, naming the first missing or unreadable file; None if it can.
    Checked without loading anything large: file headers only."""
    if not os.path.isdir(folder):
        return "no such folder"
    present = set(os.listdir(folder))
    rng = sorted(name for name in present if name.startswith("rng_state"))
    model_file = next((name for name in MODEL_FILES if name in present), None)
    if TRAJECTORY_NAME in present:  # no weights: they are rebuilt from the steps
        required = [TRAJECTORY_NAME, "trainer_state.json", SCHEDULER_NAME, *rng[:1]]
    elif model_file is None and not any(name.startswith("pytorch_model_fsdp") for name in present):
        return f"no model weights ({MODEL_FILES[0]})"
    else:
        required = [
            "trainer_state.json",
            *(["optimizer.pt", SCHEDULER_NAME] if with_optimizer else []),
            *rng[:1],
        ]
    for name in [*required, *([model_file] if model_file else [])]:
        path = os.path.join(folder, name)
        if name not in present or os.path.getsize(path) == 0:
            return f"{name} is missing"
        if not readable(path):
            return f"{name} is damaged"
    if not rng:
        return "rng_state.pth is missing"
    return None


def readable(path):
    """A cheap integrity check: the JSON parses, a torch file's zip directory (written last) is there, a
    safetensors header parses."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif path.endswith((".pt", ".pth", ".bin")):
            return zipfile.is_zipfile(path)
        elif path.endswith(".safetensors"):
            with safe_open(path, framework="pt"):
                pass
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def last_complete_checkpoint(output_dir, with_optimizer=True):
    """The newest checkpoint-N in output_dir that can be resumed from; damaged ones are skipped with a
    warning. None when there is none."""
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit():
            steps.append((int(name.split("-")[-1]), os.path.join(output_dir, name)))
    for _, folder in sorted(steps, reverse=True):
        problem = checkpoint_problem(folder, with_optimizer)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None
