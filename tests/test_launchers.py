"""The shell launchers read every setting from the environment and pass extra arguments through."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import copy_launchers

import run_lozo
import tasks
import utils
from utils import UsageError, read_result

REPO = Path(__file__).resolve().parents[1]


def launch(script, env, *args, tmp_path, base_env=None):
    copy_launchers(tmp_path)
    full_env = dict(os.environ if base_env is None else base_env, **{k: str(v) for k, v in env.items()})
    return subprocess.run(
        ["bash", str(tmp_path / script), *args], env=full_env, capture_output=True, text=True
    )


def test_lozo_sh_takes_its_settings_from_the_environment(tiny_opt_dir, data_dir, tmp_path):
    env = dict(
        MODEL=tiny_opt_dir,
        TASK="CB",
        TRAIN=8,
        EVAL=4,
        BS=4,
        STEPS=2,
        EVAL_STEPS=1,
        LR=1e-4,
        EPS=1e-2,
        RANK=3,
        STEP_INTERVAL=7,
        LOZO_OPTIMIZER="sgdm",
        BETA1=0.5,
        SEED=1,
        LOZO_DATA_DIR=data_dir,
    )
    done = launch("lozo.sh", env, "--num_dev", "4", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in [
        "rank_r = 3",
        "step_interval = 7",
        "lozo_optimizer = 'sgdm'",
        "beta1 = 0.5",
        "learning_rate = 0.0001",
        "zo_eps = 0.01",
        "max_steps = 2",
        "train_set_seed = 1",
        "lr_scheduler_type = 'constant'",
        "train_as_classification = True",
        "num_dev = 4",
    ]:
        assert setting in done.stderr, setting
    tag = "lozo-sgdm-ft-2-4-0.0001-0.01-r3-nu7-1"
    result = tmp_path / "result" / f"CB-tiny-opt-sampleeval4-ntrain8-ndev4-{tag}-trainset0.json"
    metrics, run = read_result(result)
    assert set(metrics) == {"accuracy", "dev_accuracy"} and run["settings"]["rank_r"] == 3


def test_mezo_sh_uses_mezo_and_copa_trains_on_the_gold_sequence(tiny_opt_dir, data_dir, tmp_path):
    env = dict(
        MODEL=tiny_opt_dir, TASK="Copa", TRAIN=8, EVAL=4, BS=4, STEPS=1, EVAL_STEPS=1, LOZO_DATA_DIR=data_dir
    )
    done = launch("mezo.sh", env, "--no_eval", "--verbose", tmp_path=tmp_path)  # all arguments logged
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainer = 'zo'" in done.stderr and "train_as_classification = False" in done.stderr
    assert "num_dev = 100" in done.stderr  # MeZO's Copa dev size


def test_icl_sh_defaults_and_passthrough(tiny_opt_dir, data_dir, tmp_path):
    env = dict(MODEL=tiny_opt_dir, TASK="SST2", TRAIN=2, EVAL=3, LOZO_DATA_DIR=data_dir)
    done = launch("icl.sh", env, "--sfc", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "result" / "SST2-tiny-opt-sfc-sampleeval3-ntrain2-icl-onetrainpereval.json"
    assert 0 <= read_result(result)[0]["accuracy"] <= 1


def test_unknown_mode_is_a_one_line_error(tiny_opt_dir, tmp_path):
    done = launch("lozo.sh", dict(MODEL=tiny_opt_dir, MODE="adapter"), tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown MODE=adapter; use ft (full-parameter), prefix or lora"
    ]


# MODE: (flags the run must get, MeZO's zeroth-order lr / eps, finetune.sh's first-order lr)
MODE_SETTINGS = {
    "lora": (["lora = True", "prefix_tuning = False"], "5e-5", "1e-2", "1e-4"),
    "prefix": (
        ["prefix_tuning = True", "num_prefix = 5", "no_reparam = True", "lora = False"],
        "1e-3",
        "1e-1",
        "1e-2",
    ),
}


@pytest.mark.parametrize("mode", list(MODE_SETTINGS))
def test_mode_selects_the_parameters_and_mezo_defaults(mode, tiny_opt_dir, data_dir, tmp_path):
    flags, zo_lr, zo_eps, fo_lr = MODE_SETTINGS[mode]
    env = dict(
        MODEL=tiny_opt_dir, MODE=mode, TRAIN=8, EVAL=4, BS=4, STEPS=1, EVAL_STEPS=1, LOZO_DATA_DIR=data_dir
    )
    done = launch("mezo.sh", env, "--num_dev", "4", "--verbose", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in [*flags, f"learning_rate = {float(zo_lr)!r}", f"zo_eps = {float(zo_eps)!r}"]:
        assert setting in done.stderr, setting
    adapter = (
        tmp_path / "result" / f"SST2-tiny-opt-sampleeval4-ntrain8-ndev4-mezo-{mode}-1-4-{zo_lr}-{zo_eps}-0"
    )
    assert (adapter.parent / f"{adapter.name}-trainset0-adapter" / "adapter_config.json").is_file()

    done = launch(
        "finetune.sh", dict(env, EPOCH=1), "--num_dev", "4", "--no_eval", "--verbose", tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"learning_rate = {float(fo_lr)!r}" in done.stderr and flags[0] in done.stderr


@pytest.mark.parametrize(
    ("cuda", "flags", "expected"),
    [
        (True, [], "--load_float16"),
        (False, ["avx2", "amx_bf16"], "--load_bfloat16"),
        (False, ["avx512_bf16"], "--load_bfloat16"),
        (False, ["avx2", "fma"], "--load_bfloat16"),  # no bf16 matrix instructions: float32 products
        (False, None, "--load_bfloat16"),  # flags unreadable: assume a modern CPU
    ],
)
def test_default_precision_follows_the_hardware(cuda, flags, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(utils, "cpu_flags", lambda: flags)
    assert utils.default_precision() == expected


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        (
            None,
            {"--load_float16": "load_float16 = True", "--load_bfloat16": "load_bfloat16 = True"}.get(
                utils.default_precision()
            ),
        ),  # MeZO's fp16 on a GPU, bf16 on a CPU
        ("--load_float16", "load_float16 = True"),
        ("", None),  # float32
    ],
)
def test_precision_is_honoured(precision, expected, tiny_opt_dir, data_dir, tmp_path):
    env = dict(MODEL=tiny_opt_dir, TASK="SST2", TRAIN=0, EVAL=2, LOZO_DATA_DIR=data_dir)
    if precision is not None:
        env["PRECISION"] = precision
    full_env = {k: v for k, v in os.environ.items() if k != "PRECISION"}
    done = launch("icl.sh", env, tmp_path=tmp_path, base_env=full_env)
    assert done.returncode == 0, done.stderr[-3000:]
    half = [
        line.strip()
        for line in done.stderr.splitlines()
        if "load_float16 =" in line or "load_bfloat16 =" in line
    ]
    assert (
        (expected in half)
        if expected
        else ("load_float16 = True" not in half and "load_bfloat16 = True" not in half)
    )


LAUNCHERS = ("lozo.sh", "mezo.sh", "finetune.sh", "finetune_fsdp.sh", "icl.sh")


def readme_launcher_examples():
    """Every `... bash <launcher>.sh ...` line of the README's bash blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if not line.startswith("#") and any(f"bash {name}" in line for name in LAUNCHERS):
                examples.append(line)
    return examples


def test_readme_has_launcher_examples():
    assert len(readme_launcher_examples()) >= 8


@pytest.mark.parametrize("example", readme_launcher_examples())
def test_every_readme_launcher_example_builds_a_valid_command(example, monkeypatch):
    """Run as written (with DRY_RUN=1: the launcher prints its command), then check that run_lozo accepts
    the command's arguments: model folders exist, settings are valid, the data folder is set."""
    words = shlex.split(example)
    env = dict(os.environ, DRY_RUN="1", LOZO_DATA_DIR=str(REPO.parent / "shared" / "data"))
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "bash" and words[1] in LAUNCHERS, example
    done = subprocess.run(["bash", *words[1:]], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = shlex.split(done.stdout.strip().splitlines()[-1])
    argv = printed[printed.index("run_lozo.py") + 1 :]
    monkeypatch.chdir(REPO)  # the launchers run from the repository
    monkeypatch.setenv(tasks.DATA_DIR_ENV, env["LOZO_DATA_DIR"])
    if "--fsdp" in argv and not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--fsdp needs GPUs"):
            run_lozo.parse_args(argv)
        return
    args = run_lozo.parse_args(argv)
    assert args.data_dir and os.path.isdir(args.data_dir)
