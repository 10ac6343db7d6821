"""bench/study.py plans what MeZO's protocol says: every command is one run_lozo accepts, the learning rate
is chosen on seed 0's dev accuracy only once the whole grid has run, and seed 0's final run is that
selection run (not rerun)."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest

import run_lozo
import tasks
from LOZOtrainer import TRAJECTORY_NAME

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import study  # noqa: E402


@pytest.fixture
def empty_study(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "DOCS", tmp_path)
    monkeypatch.setattr(study, "UNFINISHED", tmp_path / "unfinished")
    (tmp_path / "results").mkdir()
    return tmp_path


def write_result(folder, name, dev, accuracy=0.5):
    path = folder / "results" / f"{name}.json"
    path.write_text(json.dumps({"accuracy": accuracy, "dev_accuracy": dev, "run": {"wall_time_s": 60.0}}))


def test_every_planned_command_is_accepted(empty_study, tmp_path, monkeypatch):
    if not study.MODEL.is_dir():
        pytest.skip("models/SmolLM2-135M is made by install.sh")
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(REPO.parent / "shared" / "data"))
    for task in study.TASKS:  # every rate selected, so the final runs are planned too
        for method in [*study.ZO_METHODS, "FT"]:
            for lr in study.grid(method):
                write_result(empty_study, study.selection(task, method, lr), dev=0.6)
    planned = study.runs()
    names = [name for name, _ in planned]
    assert len(names) == len(set(names))
    for name, argv in planned:
        if isinstance(argv, str):
            continue
        args = run_lozo.parse_args([*argv, "--output_dir", str(tmp_path / name)])
        assert args.task_name in study.TASKS
        assert args.per_device_eval_batch_size == 1  # as the first runs evaluated
        if name.startswith(("select-", "LOZO", "MeZO", "FT")):
            assert args.resume_from_checkpoint == "last" and args.save_on_interrupt
            assert args.train_set_seed in study.SEEDS and args.num_train == 1000 and args.num_dev == 100


def test_the_list_counts_finished_runs_and_shows_where_unfinished_ones_stand(empty_study, capsys):
    """83 runs in all (3 tasks x (zero-shot, 3 ICL, 9 + 2 grid rates, 4 methods x 2 more seeds), LOZO and
    MeZO with 4 directions a step on SST-2's 3 seeds, and on seed 0 with the batched pair, and MeZO with
    rounded bf16, compensated bf16 and float32 weights on SST-2's seeds 0 and 1); seed 0's final run is its
    selection run and is not counted twice."""
    assert study.study_size() == 83
    for lr in study.LR_GRID:
        write_result(empty_study, study.selection("RTE", "LOZO", lr), dev=0.6)
    write_result(empty_study, "zero-shot-RTE", dev=None)
    (empty_study / "unfinished" / "select-RTE-MeZO-lr5e-06" / "checkpoint-425").mkdir(parents=True)
    study.command_list(argparse.Namespace(only="RTE", skip=""))
    lines = capsys.readouterr().out.splitlines()
    states = {line.split(": ")[0].split("  ")[-1]: line.split("  ")[0] for line in lines[:-1]}
    assert states["select-RTE-LOZO-lr1e-05"] == states["LOZO-RTE-seed0"] == "done"
    assert states["select-RTE-MeZO-lr5e-06"] == "todo (step 425 kept)"
    assert states["LOZO-RTE-seed1"] == states["icl-RTE-seed0"] == "todo"
    assert lines[-1] == "4 of 83 runs done"


def test_zeroth_order_methods_get_the_same_forward_passes_and_grid(empty_study):
    steps = {}
    for name, argv in study.runs():
        if name.startswith("select-") and "-FT-" not in name:
            steps.setdefault(argv[argv.index("--max_steps") + 1], set()).add(name.split("-lr")[0])
    assert list(steps) == [str(study.STEPS)]
    for task in study.TASKS:
        for method in study.ZO_METHODS:
            assert f"select-{task}-{method}" in steps[str(study.STEPS)]


def test_several_directions_run_at_equal_forward_passes_and_the_chosen_rate(empty_study):
    """Once SST-2's rate is chosen for a method, its 4-direction runs take a quarter of the steps (4 pairs of
    forward passes each) at that rate."""
    assert not [name for name, _ in study.runs() if "-q4-" in name]
    for lr in study.LR_GRID:
        write_result(empty_study, study.selection("SST2", "MeZO", lr), dev=0.7 if lr == 1e-5 else 0.6)
    planned = dict(study.runs())
    expected = [f"MeZO-q4-SST2-seed{s}" for s in study.SEEDS] + ["MeZO-q4-pair-SST2-seed0"]
    expected += ["MeZO-q4-SST2-seed0-timed", "MeZO-q4-pair-SST2-seed0-timed"]  # once more, side by side
    assert [name for name in planned if "-q4-" in name] == expected
    assert planned["MeZO-q4-pair-SST2-seed0"] == [*planned["MeZO-q4-SST2-seed0"], "--zo_batched_pair"]
    assert planned["MeZO-q4-SST2-seed0-timed"] == planned["MeZO-q4-SST2-seed0"]
    assert planned["MeZO-q4-pair-SST2-seed0-timed"] == planned["MeZO-q4-pair-SST2-seed0"]
    argv = planned["MeZO-q4-SST2-seed1"]
    option = {key: argv[argv.index(key) + 1] for key in ("--max_steps", "--zo_queries", "--learning_rate")}
    assert option == {"--max_steps": str(study.STEPS // 4), "--zo_queries": "4", "--learning_rate": "1e-05"}


def test_mezo_precision_runs_differ_from_the_bf16_run_only_in_the_weights_dtype(empty_study):
    """Once SST-2's MeZO rate is chosen: bf16 weights rounded at every update (the default), bf16 weights
    with a compensation buffer, and float32 weights, at that rate, on seeds 0 and 1; the runs differ from the
    bf16 one only in the weights' flags."""
    for lr in study.LR_GRID:
        write_result(empty_study, study.selection("SST2", "MeZO", lr), dev=0.7 if lr == 1e-5 else 0.6)
    planned = dict(study.runs())
    variants = ("rounded", "compensated", "float32")
    names = [name for name in planned if name.startswith(tuple(f"MeZO-{v}" for v in variants))]
    assert sorted(names) == sorted(f"MeZO-{v}-SST2-seed{s}" for v in variants for s in (0, 1))
    bf16 = planned["MeZO-SST2-seed1"]
    assert planned["MeZO-rounded-SST2-seed1"] == bf16
    compensated = planned["MeZO-compensated-SST2-seed1"]
    assert compensated.count("--zo_compensated") == 1
    assert [arg for arg in compensated if arg != "--zo_compensated"] == bf16
    assert planned["MeZO-float32-SST2-seed1"] == [arg for arg in bf16 if arg != "--load_bfloat16"]


def test_rate_is_chosen_on_dev_once_the_grid_has_run(empty_study):
    low, mid, high = study.LR_GRID
    write_result(empty_study, f"select-SST2-LOZO-lr{low:g}", dev=0.70)
    write_result(empty_study, f"select-SST2-LOZO-lr{mid:g}", dev=0.74)
    assert study.chosen_lr("SST2", "LOZO") is None
    assert not any(name.startswith("LOZO-SST2") for name, _ in study.runs())
    write_result(empty_study, f"select-SST2-LOZO-lr{high:g}", dev=0.74, accuracy=0.9)
    assert study.chosen_lr("SST2", "LOZO") == mid  # a tie goes to the smaller rate
    final = dict(study.runs())
    assert final["LOZO-SST2-seed0"] == f"select-SST2-LOZO-lr{mid:g}"  # reused, not rerun
    seed1 = final["LOZO-SST2-seed1"]
    assert seed1[seed1.index("--learning_rate") + 1] == str(mid)
    assert seed1[seed1.index("--train_set_seed") + 1] == "1"
    order = [name for name, _ in study.runs()]  # a task's seeds run before the next task begins
    assert order.index("LOZO-SST2-seed2") < order.index("zero-shot-RTE")


def test_tables_rebuild_from_the_committed_files_alone(empty_study, capsys):
    write_result(empty_study, "zero-shot-SST2", dev=0.0, accuracy=0.517)
    for seed, accuracy in zip(study.SEEDS, (0.70, 0.72, 0.74), strict=True):
        write_result(empty_study, f"MeZO-SST2-seed{seed}", dev=0.7, accuracy=accuracy)
    write_result(empty_study, "icl-SST2-seed0", dev=0.0, accuracy=0.69)
    page = empty_study / "README.md"
    page.write_text(f"# The study\n\n{study.TABLES_BEGIN}\nold\n{study.TABLES_END}\n\nThe reading.\n")
    study.command_tables(argparse.Namespace(figure=False))
    printed = capsys.readouterr().out
    assert "| zero-shot | 51.7 |" in printed
    assert "| ICL (32 demonstrations) | 69.0 (n=1) |" in printed  # a partial row says so
    assert "| MeZO | 72.0 ± 2.0 (n=3) |" in printed
    # The page gets the same tables between its markers, the rest kept; the figure is drawn only if asked.
    assert (
        page.read_text()
        == f"# The study\n\n{study.TABLES_BEGIN}\n{printed.strip()}\n{study.TABLES_END}\n\nThe reading.\n"
    )
    assert not (empty_study / "curves.png").exists()


def test_a_failed_run_keeps_its_output_in_a_log_and_stops_the_study(empty_study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    options = argparse.Namespace(threads=1)
    with pytest.raises(SystemExit) as stopped:  # a task run_lozo does not know: it exits with one line
        study.run_one("broken", ["--task_name", "NoSuchTask"], options)
    log = tmp_path / "runs" / "broken" / "run.log"
    assert "NoSuchTask" in log.read_text()
    assert f"broken stopped unfinished (exit 2); the end of {log}" in str(stopped.value)
    assert "NoSuchTask" in str(stopped.value)
    assert not (empty_study / "results" / "broken.json").exists()


def test_wall_time_sums_the_attempts_of_a_resumed_run(empty_study, tmp_path, capsys, monkeypatch):
    """A run killed after its log was last written at t=130 and resumed at t=500 that finishes at t=560
    took 30 + 60 s: the time between attempts is not counted, the killed attempt's is. Each attempt says
    what it ran on; a run made partly without a bf16 matrix unit (float32 products) is marked."""
    import os

    out, log = tmp_path / "runs" / "select-SST2-MeZO-lr1e-05", tmp_path / "runs" / "run.log"
    out.mkdir(parents=True)
    machines = iter(["Intel Xeon, bf16 unit", "AMD EPYC, float32 products"])
    monkeypatch.setattr(study, "machine", lambda: next(machines))
    study.begin_attempt(out, log, 100.0)
    log.write_text("step 1\n")
    os.utime(log, (130.0, 130.0))
    attempts = study.begin_attempt(out, log, 500.0)
    assert attempts == [[100.0, 130.0, "Intel Xeon, bf16 unit"], [500.0, None, "AMD EPYC, float32 products"]]
    study.record_wall_time("select-SST2-MeZO-lr1e-05", attempts, 560.0)
    recorded = json.loads((empty_study / "wall_times.json").read_text())["select-SST2-MeZO-lr1e-05"]
    assert recorded["machines"] == ["AMD EPYC, float32 products", "Intel Xeon, bf16 unit"]
    result = {
        "accuracy": 0.5,
        "dev_accuracy": 0.7,
        "run": {"wall_time_s": 60.0, "train_loss_last_logged": 0.6},
    }
    (empty_study / "results" / "select-SST2-MeZO-lr1e-05.json").write_text(json.dumps(result))
    study.command_tables(None)
    assert "| SST2 | MeZO | 1e-05 | 70 | 50.0 | " in (printed := capsys.readouterr().out)
    assert "| 2 min (2 attempts) † |" in printed  # 90 s, rounded
    assert "† made, at least in part, on a CPU without bf16 matrix instructions" in printed


def test_a_run_is_marked_by_its_result_where_its_attempts_name_no_machine(empty_study, capsys):
    """Runs begun before attempts recorded machines: the result's float32_products (its last attempt)."""
    times = {"select-RTE-LOZO-lr1e-05": {"seconds": 600.0, "attempts": 1}}
    (empty_study / "wall_times.json").write_text(json.dumps(times))
    for name, float32 in [("select-RTE-LOZO-lr1e-05", False), ("select-WIC-LOZO-lr1e-05", True)]:
        run = {"wall_time_s": 600.0, "train_loss_last_logged": 0.6, "float32_products": float32}
        result = {"accuracy": 0.5, "dev_accuracy": 0.7, "run": run}
        (empty_study / "results" / f"{name}.json").write_text(json.dumps(result))
    study.command_tables(None)
    printed = capsys.readouterr().out
    assert "| RTE | LOZO | 1e-05 | 70 | 50.0 | 0.600 | 10 min |" in printed
    assert "| WIC | LOZO | 1e-05 | 70 | 50.0 | 0.600 | 10 min † |" in printed


def test_the_machine_names_the_cpu_and_its_bf16_unit(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for lacks, said in [(True, "float32 products"), (False, "bf16 unit")]:
        monkeypatch.setattr(study, "cpu_lacks_fast_matmul", lambda dtype, lacks=lacks: lacks)
        name, _, unit = study.machine().rpartition(", ")
        assert unit == said and name


def test_an_unfinished_run_committed_on_one_machine_resumes_on_another(
    empty_study, tmp_path, monkeypatch, tiny_opt_dir, data_dir
):
    """A zeroth-order run stopped at step 2 of 4 leaves its step checkpoint in docs/study/unfinished/; a
    machine without the run folder (a clean clone) replays those steps and finishes the run."""
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    name, out = "select-SST2-LOZO-lr1e-06", tmp_path / "runs" / "select-SST2-LOZO-lr1e-06"
    argv = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "16", "--num_eval", "4", "--train_set_seed", "0", "--trainer", "LOZO",
        "--per_device_train_batch_size", "4", "--train_as_classification", "--learning_rate", "1e-6",
        "--max_steps", "4", *study.resumable(2), "--zo_trajectory_checkpoints",
    ]  # fmt: skip
    # The first machine: two steps done (the run is stopped after its checkpoint-2), then it goes away.
    assert run_lozo.main([*argv, "--output_dir", str(out), "--no_eval", "--save_total_limit", "2"]) == 0
    shutil.rmtree(out / "checkpoint-4")
    study.keep_unfinished(name, out, [[100.0, None]])
    kept = empty_study / "unfinished" / name
    assert sorted(p.name for p in kept.iterdir()) == ["attempts.json", "checkpoint-2"]
    assert sum(f.stat().st_size for f in (kept / "checkpoint-2").iterdir()) < 64_000
    shutil.rmtree(tmp_path / "runs")

    study.run_one(name, argv, argparse.Namespace(threads=1))
    log = (out / "run.log").read_text()
    assert "resuming from" in log and "replaying 2 zeroth-order steps" in log
    assert (empty_study / "results" / f"{name}.json").exists()
    assert not kept.exists()  # finished: nothing left to resume
    times = json.loads((empty_study / "wall_times.json").read_text())
    assert times[name]["attempts"] == 2


def test_a_run_that_exits_0_without_a_result_is_kept_not_cleaned_up(
    empty_study, tmp_path, monkeypatch, tiny_opt_dir, data_dir
):
    """--save_on_interrupt: SIGTERM checkpoints and exits 0 with no result. The study must stop there, with
    the steps kept for the next machine, not take the run as finished and delete its checkpoints."""
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    name, out = "select-SST2-MeZO-lr1e-06", tmp_path / "runs" / "select-SST2-MeZO-lr1e-06"
    argv = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "16", "--train_set_seed", "0", "--trainer", "zo", "--per_device_train_batch_size", "4",
        "--train_as_classification", "--max_steps", "2", *study.resumable(2), "--zo_trajectory_checkpoints",
        "--no_eval",  # like an interrupted run: exit 0, no result
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=f"{name} stopped unfinished \\(exit 0\\)"):
        study.run_one(name, argv, argparse.Namespace(threads=1))
    assert (out / "checkpoint-2").is_dir()
    assert (empty_study / "unfinished" / name / "checkpoint-2" / TRAJECTORY_NAME).is_file()
    assert not (empty_study / "wall_times.json").exists()


def test_keeping_replaces_the_older_checkpoint_whole(empty_study, tmp_path):
    out = tmp_path / "run"
    for step in (25, 50):
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        for file in ("trainer_state.json", TRAJECTORY_NAME):
            (checkpoint / file).write_text("{}")
        (checkpoint / "rng_state.pth").write_bytes(zip_bytes())
        (checkpoint / "scheduler.pt").write_bytes(zip_bytes())
        study.keep_unfinished("run", out, [[10.0, 20.0], [30.0, None, "AMD EPYC, float32 products"]])
        kept = empty_study / "unfinished" / "run"
        assert [p.name for p in kept.glob("checkpoint-*")] == [f"checkpoint-{step}"]
        attempts = json.loads((kept / "attempts.json").read_text())
        assert attempts[0] == [10.0, 20.0] and attempts[1][1] > 30.0  # the running attempt: ended by now
        assert attempts[1][2] == "AMD EPYC, float32 products"  # and its machine is kept
    assert not list(empty_study.glob("unfinished/.*"))  # no staging folder left behind


def zip_bytes():
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", b"0")
    return buffer.getvalue()


def test_wall_times_compare_only_on_the_same_kind_of_machine(empty_study):
    """The batched pair's wall-time row compares the timed runs' training times (from their logs) and whole
    runs only when they ran on the same machines; the precision table pairs MeZO's bf16 and float32
    accuracies by seed."""
    names = ["MeZO-q4-SST2-seed0-timed", "MeZO-q4-pair-SST2-seed0-timed"]
    assert study.pair_row("SST2", "MeZO") is None  # not run yet
    (empty_study / "logs").mkdir()
    for name, accuracy, trained in zip(names, (0.7, 0.69), (600.0, 480.0), strict=True):
        write_result(empty_study, name, dev=0.7, accuracy=accuracy)
        history = [{"loss": 0.7, "step": 10}, {"train_runtime": trained, "step": 250}]
        (empty_study / "logs" / f"{name}.json").write_text(json.dumps(history))
    times = {name: {"seconds": 720.0, "attempts": 1, "machines": ["CPU A, bf16 unit"]} for name in names}
    (empty_study / "wall_times.json").write_text(json.dumps(times))
    row = "| SST2 | MeZO | 10.0 min | 8.0 min | 0.80 | 12.0 / 12.0 min | 70.0 / 69.0 |"
    assert study.pair_row("SST2", "MeZO") == row
    times[names[1]]["machines"] = ["CPU B, float32 products"]
    (empty_study / "wall_times.json").write_text(json.dumps(times))
    assert "not comparable: CPU A, bf16 unit / CPU B, float32 products" in study.pair_row("SST2", "MeZO")
    for seed, (master, rounded, full) in enumerate([(0.70, 0.69, 0.72), (0.71, 0.70, 0.70)]):
        write_result(empty_study, f"MeZO-SST2-seed{seed}", dev=0.7, accuracy=master)
        write_result(empty_study, f"MeZO-rounded-SST2-seed{seed}", dev=0.7, accuracy=rounded)
        write_result(empty_study, f"MeZO-float32-SST2-seed{seed}", dev=0.7, accuracy=full)
    write_result(empty_study, "MeZO-compensated-SST2-seed1", dev=0.7, accuracy=0.73)  # one seed so far
    cells = study.precision_table()[-1].split(" | ")[1:]
    assert cells == [
        "70.5 ± 0.7 (n=2)",
        "73.0 (n=1)",
        "69.5 ± 0.7 (n=2)",
        "71.0 ± 1.4 (n=2)",
        "-0.5 ± 2.1 (n=2)",
        "3.0 (n=1)",
        "-1.5 ± 2.1 (n=2) |",
    ]
