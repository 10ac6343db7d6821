"""The Python API as the README shows it: examples/ run end to end on the tiny OPT and train it, and
`ZOArguments` defaults are run_lozo.py's."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_lozo
from LOZOtrainer import ZOArguments

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["trainer_lozo.py", "plain_loop.py"])
def test_example_trains_and_saves(script, tiny_opt_dir, tmp_path):
    command = [sys.executable, str(REPO / "examples" / script), "--model", str(tiny_opt_dir)]
    done = subprocess.run([*command, "--output_dir", str(tmp_path), "--steps", "12"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    start, saved = load_file(tiny_opt_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = [name for name in start if not torch.equal(start[name], saved[name])]
    assert changed and all(torch.isfinite(t).all() for t in saved.values())


def test_zo_arguments_defaults_are_run_lozos():
    ours = run_lozo.parse_args(["--trainer", "LOZO", "--train_set_seed", "0"])
    for field in dataclasses.fields(ZOArguments):
        assert getattr(ZOArguments(), field.name) == getattr(ours, field.name), field.name
