"""Data-parallel ZO over torch.distributed (2 gloo processes on the CPU, started by torchrun) against one
process on the global batch; the multi-process launchers, checked by dry runs of their command lines."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from conftest import copy_launchers, save_tiny_opt
from distributed_worker import train_and_record
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

import run_lozo
from LOZOtrainer import STAGING_DIR, checkpoint_problem
from utils import read_result

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
STEPS = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zo_args(model, out, trainer, batch, data_dir):
    """3 steps on 24 SST-2 samples; eps 1e-2 keeps float rounding in (L+ − L−) / 2ε small against g."""
    return [
        "--task_name", "SST2", "--model_name", str(model), "--data_dir", str(data_dir),
        "--output_dir", str(out), "--result_file", str(out / "result.json"),
        "--num_train", "24", "--num_eval", "4", "--train_set_seed", "0", "--train_as_classification",
        "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS), "--seed", "7",
        "--learning_rate", "0.05", "--zo_eps", "1e-2", "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS), "--trainer", trainer,
    ]  # fmt: skip


PAIR_Q2 = ["--zo_batched_pair", "--zo_queries", "2"]  # 2 directions a step, each pair one forward
RUNS = {"LOZO": ("LOZO", []), "zo": ("zo", []), "LOZO-pair-q2": ("LOZO", PAIR_Q2)}


def zero_shot_args(model, out, data_dir):
    return [
        "--task_name", "SST2", "--model_name", str(model), "--data_dir", str(data_dir),
        "--output_dir", str(out), "--result_file", str(out / "result.json"),
        "--num_train", "0", "--train_set_seed", "0", "--num_eval", "5",  # 5: uneven shards, 3 + 2
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tiny_opt_dir, data_dir, tmp_path_factory):
    """One torchrun launch, 2 processes × 4 samples per step, every scenario in turn: LOZO and MeZO on the
    tiny OPT (LOZO also with 2 directions a step as batched pairs), LOZO on a 4× wider OPT (does the
    traffic grow with the model?), zero-shot evaluation, LOZO with SIGUSR1 sent to rank 1 only."""
    out = tmp_path_factory.mktemp("two-processes")
    wider = save_tiny_opt(out / "wider-opt", hidden_size=64, word_embed_proj_dim=64, ffn_dim=256)
    runs = {
        "LOZO": {"argv": zo_args(tiny_opt_dir, out / "LOZO", "LOZO", 4, data_dir)},
        "zo": {"argv": zo_args(tiny_opt_dir, out / "zo", "zo", 4, data_dir)},
        "LOZO-pair-q2": {
            "argv": [*zo_args(tiny_opt_dir, out / "LOZO-pair-q2", "LOZO", 4, data_dir), *PAIR_Q2]
        },
        "LOZO-wider": {"argv": zo_args(wider, out / "LOZO-wider", "LOZO", 4, data_dir)},
        "zero-shot": {"argv": zero_shot_args(tiny_opt_dir, out / "zero-shot", data_dir)},
        "interrupt": {
            "argv": [*zo_args(tiny_opt_dir, out / "interrupt", "LOZO", 4, data_dir), "--save_on_interrupt"],
            "interrupt_rank": 1,
        },
    }
    (out / "runs.json").write_text(json.dumps(runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = [*command, str(out / "runs.json")]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def record(folder, rank):
    return json.loads((folder / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_of_4_take_the_step_of_one_process_of_8(
    run, two_processes, tiny_opt_dir, data_dir, tmp_path
):
    assert "WORLD_SIZE" not in os.environ  # the reference runs in this single process
    trainer, extra = RUNS[run]
    train_and_record([*zo_args(tiny_opt_dir, tmp_path, trainer, 8, data_dir), *extra], tmp_path)
    start = {k: v for k, v in AutoModelForCausalLM.from_pretrained(tiny_opt_dir).named_parameters()}
    single = torch.load(tmp_path / "rank0.pt")
    replicas = [torch.load(two_processes / run / f"rank{r}.pt") for r in (0, 1)]
    assert record(two_processes / run, 0)["world_size"] == 2
    worst = 0.0
    for name, weight in single.items():
        step = (weight - start[name].detach()).abs().max().item()
        assert step > 0, name
        assert torch.equal(replicas[0][name], replicas[1][name]), name  # the replicas never drift apart
        worst = max(worst, (replicas[0][name] - weight).abs().max().item() / step)
    assert worst < 1e-3, worst  # float rounding: 2 × 4 losses summed instead of 8 (measured 1e-5 to 3e-5)


def test_a_step_exchanges_three_scalars_whatever_the_model_size(two_processes):
    """Wrapping every collective of torch.distributed: inside each optimisation step, one all-reduce of
    (L+ sum, L− sum, items) in float64; over the whole training, the same calls for a 4× wider model."""
    sizes, trainings = [], []
    for name in ("LOZO", "LOZO-wider"):
        weights = torch.load(two_processes / name / "rank0.pt")
        sizes.append(sum(w.numel() for w in weights.values()))
        for rank in (0, 1):
            found = record(two_processes / name, rank)
            assert found["model_wrapped"] == "OPTForCausalLM"  # no DistributedDataParallel around it
            steps = [c for c in found["calls"] if c["phase"].startswith("step")]
            assert [c["phase"] for c in steps] == [f"step{i}" for i in range(STEPS)]
            for call in steps:
                assert (call["op"], call["numel"], call["bytes"], call["dtypes"]) == (
                    "all_reduce",
                    3,
                    24,
                    ["torch.float64"],
                )
            training = [c for c in found["calls"] if c["phase"] != "outside"]
            assert all(c["op"] != "_broadcast_coalesced" for c in found["calls"])
            trainings.append([(c["op"], c["numel"], c["dtypes"]) for c in training])
    assert sizes[1] > 3 * sizes[0]
    assert trainings[0] == trainings[2]  # the wider model's training sent exactly the same


def test_rank_zero_alone_writes_results_and_checkpoints(two_processes):
    for name in ("LOZO", "zo"):
        assert record(two_processes / name, 0).get("results_written") == 1
        assert record(two_processes / name, 1).get("results_written") is None
        assert set(read_result(two_processes / name / "result.json")[0]) == {"accuracy"}
        saved = load_file(two_processes / name / f"checkpoint-{STEPS}" / "model.safetensors")
        trained = torch.load(two_processes / name / "rank0.pt")
        for key, weight in saved.items():
            assert torch.equal(weight, trained[key]), key


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(two_processes):
    """Without agreement, rank 0 would wait forever in step 2's all-reduce (and the test would time out).
    The checkpoint is complete, with both ranks' RNG states (rank 0 renames it after both wrote)."""
    assert [record(two_processes / "interrupt", rank)["global_step"] for rank in (0, 1)] == [2, 2]
    checkpoint = two_processes / "interrupt" / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
    assert list((two_processes / "interrupt" / STAGING_DIR).iterdir()) == []
    assert record(two_processes / "interrupt", 0).get("results_written") is None  # a partial run has none


def test_evaluation_is_sharded_and_gathered_in_sample_order(two_processes, tiny_opt_dir, data_dir, tmp_path):
    counts = [record(two_processes / "zero-shot", rank).get("predicted") for rank in (0, 1)]
    assert counts == [3, 2]
    single = train_and_record(zero_shot_args(tiny_opt_dir, tmp_path, data_dir), tmp_path)
    assert single["predicted"] == 5
    for rank in (0, 1):
        assert record(two_processes / "zero-shot", rank)["predictions"] == single["predictions"]


# ---- launchers: dry runs through a torchrun that prints its command line ----


def dry_run(script, env, *args, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    copy_launchers(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" torchrun "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **{k: str(v) for k, v in env.items()})
    command = ["bash", str(tmp_path / script), *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True)


def test_num_gpu_starts_one_process_per_gpu_through_torchrun(tmp_path):
    env = dict(NUM_GPU=4, TORCHRUN_ARGS="--nnodes 2 --rdzv_backend c10d --rdzv_endpoint head:29500")
    for script, trainer in [("lozo.sh", "LOZO"), ("mezo.sh", "zo")]:
        done = dry_run(script, env, "--save_model", tmp_path=tmp_path / script)
        assert done.returncode == 0, done.stderr
        argv = done.stdout.splitlines()
        assert argv[:9] == [
            "torchrun", "--nproc_per_node", "4",
            "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "head:29500",
        ]  # fmt: skip
        assert argv[9] == "run_lozo.py" and argv[-1] == "--save_model"
        assert argv[argv.index("--trainer") + 1] == trainer


def test_finetune_fsdp_sh_shards_each_decoder_layer(tiny_opt_dir, tiny_llama_dir, tmp_path):
    env = dict(NUM_GPU=4, MODEL=tiny_opt_dir, TASK="SST2", MODE="ft", LR="1e-5")
    done = dry_run("finetune_fsdp.sh", env, "--max_steps", "2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[:4] == ["torchrun", "--nproc_per_node", "4", "run_lozo.py"]
    assert {"--fsdp", "--no_auto_device"} <= set(argv) and argv[-2:] == ["--max_steps", "2"]
    assert argv[argv.index("--trainer") + 1] == "regular"
    assert argv[argv.index("--learning_rate") + 1] == "1e-5"
    # What the Trainer hands accelerate for these FSDP options (on a GPU machine; --fsdp is refused here).
    fsdp_config = json.loads(argv[argv.index("--fsdp_config") + 1])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), fsdp=True, fsdp_config=fsdp_config)
    assert args.fsdp_plugin_args["reshard_after_forward"] is True  # full shard
    for model_dir, layer in [(tiny_opt_dir, "OPTDecoderLayer"), (tiny_llama_dir, "LlamaDecoderLayer")]:
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        plugin.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(model_dir))
        assert [cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]] == [layer]


def test_finetune_fsdp_sh_needs_two_processes_and_full_parameters(tmp_path):
    done = dry_run("finetune_fsdp.sh", dict(NUM_GPU=1), tmp_path=tmp_path / "one")
    assert done.returncode == 2 and done.stdout == ""  # torchrun never started
    assert done.stderr.strip().startswith("error: FSDP shards over several processes")
    done = dry_run("finetune_fsdp.sh", dict(NUM_GPU=2, MODE="lora"), tmp_path=tmp_path / "lora")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer", "regular", "--fsdp"], "error: --fsdp needs GPUs"),
        (["--trainer", "LOZO", "--fsdp"], "error: --fsdp shards gradients and optimizer state"),
    ],
)
def test_fsdp_that_cannot_work_is_a_one_line_error(extra, message, capsys):
    code = run_lozo.main(["--output_dir", "unused", "--train_set_seed", "0", *extra])
    assert code == 2
    assert capsys.readouterr().err.startswith(message)
