"""LOZO against MeZO at equal forward passes: SmolLM2-135M in bf16, three tasks × three train-set seeds.

    python bench/study.py run              # every run that has no result yet, in order (resumable)
    python bench/study.py run --only RTE   # the runs whose name contains RTE
    python bench/study.py run --only MeZO --threads 1 & python bench/study.py run --skip MeZO --threads 1
                                           # two workers side by side (MeZO's Gaussian draws use one core)
    python bench/study.py list             # the runs, done or not (and an unfinished run's kept step),
                                           # with their commands (--dry-run style), and how many are done
    python bench/study.py tables           # the README's table and figure, from docs/study/ alone

MeZO's protocol: 1,000 training and 100 dev samples drawn with train-set seed 0, 1, 2; accuracy on the
whole validation split. Zeroth-order methods (LOZO, LOZO-M, MeZO) all take STEPS steps of batch 8, two
forward passes each: the same number of forward passes. Their learning rate is chosen on seed 0's dev
accuracy from the same grid for every method (LR_GRID), then the chosen rate runs on all three seeds.
First-order fine-tuning (AdamW, 5 epochs) is the accuracy a zeroth-order method is chasing; zero-shot and
in-context learning (32 demonstrations, one shared set per seed) are the floors.

Each run writes its result JSON to docs/study/results/<name>.json and the loss / dev history of its
trainer_state.json to docs/study/logs/<name>.json (small, committed), so the tables and the figure
rebuild without rerunning. A run whose result exists is skipped, so an interrupted study resumes.

A run outlives the machine it started on: a zeroth-order run checkpoints its steps (g and learning rate,
--zo_trajectory_checkpoints), and while it runs its newest checkpoint (tens of kilobytes) is copied into
docs/study/unfinished/<name>/. Commit that folder; wherever the study runs next, the run resumes from it
(its steps replayed onto the starting weights, no forward pass) instead of starting over.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from LOZOtrainer import checkpoint_problem, holds_steps, last_complete_checkpoint  # noqa: E402
from utils import cpu_info, cpu_lacks_fast_matmul, read_result, replace_folder  # noqa: E402

DOCS = REPO / "docs" / "study"
RUNS = REPO / "result" / "study"  # run folders: checkpoints while a run is unfinished, and its log
UNFINISHED = DOCS / "unfinished"  # committed copies of unfinished runs' newest step checkpoints
FLOAT32_PRODUCTS = "float32 products"  # an attempt's machine had no bf16 matrix unit (see machine())
KEEP_EVERY_S = 60  # how often a running run's newest checkpoint is copied there
MODEL = REPO / "models" / "SmolLM2-135M"
TASKS = ("SST2", "RTE", "WIC")
SEEDS = (0, 1, 2)
STEPS = 1000
EVAL_EVERY = 250
ZO_METHODS = {
    "LOZO": ["--trainer", "LOZO", "--rank_r", "2", "--step_interval", "50"],
    "LOZO-M": ["--trainer", "LOZO", "--rank_r", "2", "--step_interval", "50", "--lozo_optimizer", "sgdm"],
    "MeZO": ["--trainer", "zo"],
}
# The same for all three methods. It began as (1e-5, 2e-5, 5e-5), around the 2e-5 of the 300-step SST-2
# runs; on SST-2 every method lost dev accuracy from 1e-5 to 2e-5 (LOZO-M's loss rose), so 5e-5 was
# dropped unrun and 5e-6 added. LOZO and LOZO-M then chose 5e-6 by dev margins inside the noise of 100
# dev samples, so the grid was not moved again.
LR_GRID = (5e-6, 1e-5, 2e-5)
# Several directions a step at an equal number of forward passes: QUERIES directions (--zo_queries) for
# STEPS / QUERIES steps, at the rate chosen for one direction, against the one-direction runs above.
QUERIES, QUERY_TASKS, QUERY_METHODS = 4, ("SST2",), ("LOZO", "MeZO")
# What half precision costs MeZO in accuracy, at the rate chosen above, on these tasks and seeds: its bf16
# runs above kept a float32 master copy of the weights (the default when they ran); PRECISIONS' runs keep
# bf16 weights at inference memory (the update rounded stochastically: today's default), bf16 weights with a
# bf16 compensation buffer (+2 bytes a weight), or float32 weights: the flags of each.
PRECISION_TASKS, PRECISION_SEEDS = ("SST2",), (0, 1)
BF16 = ("--load_bfloat16",)
PRECISIONS = {"rounded": BF16, "compensated": (*BF16, "--zo_compensated"), "float32": ()}
FT_LRS = (1e-5, 3e-5)
# Zeroth-order checkpoints hold steps, not weights: cheap to write and they leave the run untouched, so
# often. FT's hold weights and AdamW's moments (1.6 GB): every epoch.
SAVE_EVERY = {"LOZO": 25, "LOZO-M": 25, "MeZO": 25, "FT": 125}


def here(path):
    """`path` relative to the repository, where the runs start: their records hold no path of this machine."""
    return os.path.relpath(path, REPO)


def common(task, seed, precision=BF16):
    """The arguments every run shares; `precision`: the weights' flags (none: float32 weights)."""
    # Evaluation one sample at a time, as MeZO and the study's first runs evaluated: batched scoring
    # (run_lozo's default) computes the same scores but rounds differently in bf16: it can flip a near tie.
    return [
        "--task_name", task, "--model_name", here(MODEL), *precision,
        "--per_device_eval_batch_size", "1",
        "--data_dir", os.environ.get("LOZO_DATA_DIR", here(REPO.parent / "shared" / "data")),
        "--train_set_seed", str(seed),
    ]  # fmt: skip


def zo_run(task, method, seed, lr, queries=1, precision=BF16):
    return [
        *common(task, seed, precision), *ZO_METHODS[method], "--num_train", "1000", "--num_dev", "100",
        "--per_device_train_batch_size", "8", "--learning_rate", str(lr), "--zo_eps", "1e-3",
        "--lr_scheduler_type", "constant", "--max_steps", str(STEPS // queries), "--logging_steps", "10",
        "--eval_strategy", "steps", "--eval_steps", str(EVAL_EVERY // queries), "--train_as_classification",
        *resumable(SAVE_EVERY[method]), "--zo_trajectory_checkpoints",
        *(["--zo_queries", str(queries)] if queries > 1 else []),
    ]  # fmt: skip


def ft_run(task, seed, lr):
    return [
        # AdamW's steps (~lr) are far below a bf16 weight's last bit: float32 weights, bf16 autocast.
        *common(task, seed, ("--bf16",)), "--trainer", "regular", "--num_train", "1000", "--num_dev", "100",
        "--per_device_train_batch_size", "8", "--learning_rate", str(lr), "--num_train_epochs", "5",
        "--logging_steps", "10", "--eval_strategy", "epoch", "--train_as_classification",
        *resumable(SAVE_EVERY["FT"]),
    ]  # fmt: skip


def resumable(every):
    """A run killed (or its session ended) continues from its newest checkpoint when the study reruns."""
    return [
        "--save_strategy", "steps", "--save_steps", str(every), "--save_total_limit", "1",
        "--save_on_interrupt", "--resume_from_checkpoint", "last",
    ]  # fmt: skip


def grid(method):
    return FT_LRS if method == "FT" else LR_GRID


def selection(task, method, lr):
    """The name of the seed-0 run that tries this rate."""
    return f"select-{task}-{method}-lr{lr:g}"


def chosen_lr(task, method):
    """The grid's rate with the best seed-0 dev accuracy (ties: the smaller rate), once all have run."""
    found = {}
    for lr in grid(method):
        path = DOCS / "results" / f"{selection(task, method, lr)}.json"
        if not path.exists():
            return None
        found[lr] = read_result(path)[0]["dev_accuracy"]
    return max(found, key=lambda lr: (found[lr], -lr))


def runs():
    """(name, run_lozo arguments) in the order they run; final runs appear once their rate is chosen."""
    planned = []
    for task in TASKS:
        planned.append((f"zero-shot-{task}", [*common(task, 0)[:-2], "--num_train", "0"]))
        for seed in SEEDS:
            planned.append((f"icl-{task}-seed{seed}", [*common(task, seed), "--num_train", "32"]))
        for method in ZO_METHODS:
            for lr in LR_GRID:
                planned.append((selection(task, method, lr), zo_run(task, method, 0, lr)))
        for lr in FT_LRS:
            planned.append((selection(task, "FT", lr), ft_run(task, 0, lr)))
        for method in [*ZO_METHODS, "FT"]:
            lr = chosen_lr(task, method)
            if lr is None:
                continue
            for seed in SEEDS:  # right after the task's selections, so a task's table row fills first
                # Seed 0 at the chosen rate is the selection run itself: reused, not rerun.
                name = f"{method}-{task}-seed{seed}"
                if seed == 0:
                    planned.append((name, selection(task, method, lr)))
                else:
                    argv = ft_run(task, seed, lr) if method == "FT" else zo_run(task, method, seed, lr)
                    planned.append((name, argv))
        for method in QUERY_METHODS if task in QUERY_TASKS else ():
            lr = chosen_lr(task, method)
            for seed in SEEDS if lr is not None else ():
                name = f"{method}-q{QUERIES}-{task}-seed{seed}"
                planned.append((name, zo_run(task, method, seed, lr, queries=QUERIES)))
            if lr is not None:  # its wall time with a step's 2q evaluations as one forward
                argv = [*zo_run(task, method, 0, lr, queries=QUERIES), "--zo_batched_pair"]
                planned.append((f"{method}-q{QUERIES}-pair-{task}-seed0", argv))
                planned += timed_runs(task, method, lr)
        lr = chosen_lr(task, "MeZO") if task in PRECISION_TASKS else None
        for seed in PRECISION_SEEDS if lr is not None else ():
            for variant, precision in PRECISIONS.items():
                argv = zo_run(task, "MeZO", seed, lr, precision=precision)
                planned.append((f"MeZO-{variant}-{task}-seed{seed}", argv))
    return planned


def timed_runs(task, method, lr):
    """Seed 0's run with several directions, as separate forwards and with the batched pair, once more each:
    the two run side by side on one machine, one thread each, so that their wall times compare:

        python bench/study.py run --only LOZO-q4-SST2-seed0-timed --threads 1 &
        python bench/study.py run --only LOZO-q4-pair-SST2-seed0-timed --threads 1
    """
    argv = zo_run(task, method, 0, lr, queries=QUERIES)
    return [
        (timed(method, task, ""), argv),
        (timed(method, task, "-pair"), [*argv, "--zo_batched_pair"]),
    ]


def timed(method, task, variant):
    return f"{method}-q{QUERIES}{variant}-{task}-seed0-timed"


def run_one(name, argv, opts):
    results, logs = DOCS / "results", DOCS / "logs"
    if isinstance(argv, str):  # an alias of a selection run
        for folder in (results, logs):
            if (folder / f"{argv}.json").exists() and not (folder / f"{name}.json").exists():
                (folder / f"{name}.json").write_text((folder / f"{argv}.json").read_text())
        return
    out = RUNS / name
    restore_unfinished(name, out)
    command = [sys.executable, str(REPO / "run_lozo.py"), *argv, "--output_dir", here(out)]
    command += ["--result_file", here(results / f"{name}.json"), "--report_to", "none", "--tag", name]
    began = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads)) if opts.threads else None
    # A run takes up to an hour and a half: its output goes to a file you can follow (tail -f), appended
    # across resumes, rather than being held until it ends.
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    attempts = begin_attempt(out, log, began)
    print(f"{name}: running, output in {log}", flush=True)
    with open(log, "a") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while (returncode := wait(process, KEEP_EVERY_S)) is None:
            keep_unfinished(name, out, attempts)
    if returncode != 0 or not (results / f"{name}.json").exists():
        keep_unfinished(name, out, attempts)  # the newest steps, also of a run stopped by a signal (exit 0)
        tail = log.read_text()[-3000:]
        sys.exit(f"error: {name} stopped unfinished (exit {returncode}); the end of {log}:\n{tail}")
    record_wall_time(name, attempts, time.time())
    shutil.rmtree(UNFINISHED / name, ignore_errors=True)
    state = out / "trainer_state.json"
    if state.exists():  # keep the curves (small), not the run folder
        history = json.loads(state.read_text())["log_history"]
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.json").write_text(json.dumps(history) + "\n")
    for checkpoint in out.glob("checkpoint-*"):  # finished: the resume points are not needed any more
        shutil.rmtree(checkpoint)
    print(f"{name}: {read_result(results / f'{name}.json')[0]} ({time.time() - began:.0f} s)", flush=True)


def wait(process, seconds):
    """The process's exit code, or None if it is still running after `seconds`."""
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def keep_unfinished(name, out, attempts):
    """Copy the run's newest step checkpoint, and its attempts so far, into docs/study/unfinished/<name>/,
    replacing the older copy in one rename once the new one is checked whole (the trainer may rotate a
    checkpoint away mid-copy: that round is skipped)."""
    staged = UNFINISHED / f".{name}"  # git-ignored
    try:
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is None or not holds_steps(checkpoint):
            return  # none yet, or one that holds weights (first-order): too large to commit
        if (UNFINISHED / name / Path(checkpoint).name).is_dir():
            return  # kept already
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(checkpoint, staged / Path(checkpoint).name)
        if checkpoint_problem(staged / Path(checkpoint).name) is not None:
            return
    except (OSError, shutil.Error):
        return
    # The attempt goes on; if this machine goes away, it ended about now.
    running = [attempts[-1][0], time.time(), *attempts[-1][2:]]
    (staged / "attempts.json").write_text(json.dumps([*attempts[:-1], running]) + "\n")
    replace_folder(str(staged), str(UNFINISHED / name))


def restore_unfinished(name, out):
    """Put a committed unfinished checkpoint, and the attempts that made it, back into the run folder,
    unless the run got further here."""
    kept = UNFINISHED / name
    checkpoints = list(kept.glob("checkpoint-*")) if kept.is_dir() else []
    if not checkpoints:
        return
    here = last_complete_checkpoint(out)
    if here is not None and checkpoint_step(here) >= checkpoint_step(checkpoints[0]):
        return
    out.mkdir(parents=True, exist_ok=True)
    staged = out / f".{checkpoints[0].name}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(checkpoints[0], staged)
    replace_folder(str(staged), str(out / checkpoints[0].name))
    shutil.copyfile(kept / "attempts.json", out / "attempts.json")
    print(f"{name}: resuming from the committed {kept / checkpoints[0].name}", flush=True)


def machine():
    """What an attempt runs on, to read its wall time by: the GPU, or the CPU and whether it has bf16 matrix
    instructions (without them run_lozo multiplies in float32, about 3x slower a step than with AMX)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    unit = FLOAT32_PRODUCTS if cpu_lacks_fast_matmul(torch.bfloat16) else "bf16 unit"
    return f"{cpu_info('model name') or 'CPU'}, {unit}"


def begin_attempt(out, log, now):
    """Start a new attempt in <run>/attempts.json ([[start, end, machine], ...]; runs begun before machines
    were recorded have [start, end]). An attempt that was killed (the machine went away) never wrote its
    end: it ended when its log was last written."""
    path = out / "attempts.json"
    attempts = json.loads(path.read_text()) if path.exists() else []
    if attempts and attempts[-1][1] is None:
        attempts[-1][1] = log.stat().st_mtime if log.exists() else attempts[-1][0]
    attempts.append([now, None, machine()])
    path.write_text(json.dumps(attempts) + "\n")
    return attempts


def record_wall_time(name, attempts, now):
    """A finished run's wall time summed over its attempts (steps redone after a resume count too), in
    docs/study/wall_times.json: a resumed run's result only knows its last attempt's."""
    attempts[-1][1] = now
    path = DOCS / "wall_times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[name] = {
        "seconds": round(sum(attempt[1] - attempt[0] for attempt in attempts), 1),
        "attempts": len(attempts),
        "machines": sorted({attempt[2] for attempt in attempts if len(attempt) > 2}),
    }
    path.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


def recorded_wall_time(name):
    """A finished run's entry in docs/study/wall_times.json, or None."""
    path = DOCS / "wall_times.json"
    return json.loads(path.read_text()).get(name) if path.exists() else None


def wall_time(name, run):
    """(minutes, attempts, whether any attempt multiplied in float32) of a finished run: summed over its
    attempts where recorded, else its result's."""
    recorded = recorded_wall_time(name)
    float32 = run.get("float32_products", False)  # the last attempt's
    if recorded:
        float32 |= any(m.endswith(FLOAT32_PRODUCTS) for m in recorded.get("machines", []))
        return recorded["seconds"] / 60, recorded["attempts"], float32
    return run.get("wall_time_s", 0) / 60, 1, float32


def command_run(opts):
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    while True:  # selections finishing make final runs appear: plan again until nothing is left
        pending = [
            (n, a) for n, a in runs() if wanted(n, opts) and not (DOCS / "results" / f"{n}.json").exists()
        ]
        if not pending:
            break
        run_one(*pending[0], opts)


def wanted(name, opts):
    return opts.only in name and not (opts.skip and opts.skip in name)


def command_list(opts):
    """Every planned run, done or to do (with the step an unfinished one is kept at), then the count."""
    done = 0
    for name, argv in runs():
        alias = isinstance(argv, str)  # seed 0's final run is its selection run: done with it
        finished = (DOCS / "results" / f"{argv if alias else name}.json").exists()
        done += finished and not alias
        if wanted(name, opts):
            step = kept_step(name)
            state = "done" if finished else f"todo (step {step} kept)" if step else "todo"
            shown = argv if alias else " ".join(argv)
            print(f"{state}  {name}: {shown}")
    print(f"{done} of {study_size()} runs done")


def kept_step(name):
    """The step of an unfinished run's committed checkpoint, or None."""
    checkpoints = list((UNFINISHED / name).glob("checkpoint-*"))
    return checkpoint_step(checkpoints[0]) if checkpoints else None


def checkpoint_step(checkpoint):
    return int(Path(checkpoint).name.split("-")[-1])


def study_size():
    """Runs in the whole study, final runs included before their rates are chosen: per task zero-shot,
    ICL per seed, every grid rate on seed 0, and each method on the seeds after 0."""
    selections = len(ZO_METHODS) * len(LR_GRID) + len(FT_LRS)
    per_task = 1 + len(SEEDS) + selections + (len(ZO_METHODS) + 1) * (len(SEEDS) - 1)
    queries = len(QUERY_TASKS) * len(QUERY_METHODS) * (len(SEEDS) + 1)
    return len(TASKS) * per_task + queries + len(PRECISION_TASKS) * len(PRECISION_SEEDS) * len(PRECISIONS)


# ---- tables and figure from docs/study/ ----

ROWS = ["zero-shot", "icl", "LOZO", "LOZO-M", "MeZO", "FT"]


def accuracies(row, task):
    if row == "zero-shot":
        names = [f"zero-shot-{task}"]
    else:
        names = [f"{row}-{task}-seed{seed}" for seed in SEEDS]
    found = [DOCS / "results" / f"{n}.json" for n in names]
    return [100 * read_result(p)[0]["accuracy"] for p in found if p.exists()]


def cell(values, seeded=True):
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f} (n=1)" if seeded else f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"


TABLES_BEGIN = "<!-- the study's tables: written by `python bench/study.py tables`, not by hand -->"
TABLES_END = "<!-- end of the study's tables -->"


def rates(row):
    """'lr 5e-6; RTE 1e-5': the chosen rate of most tasks, then the tasks that chose another."""
    chosen = {task: chosen_lr(task, row) for task in TASKS}
    if None in chosen.values():
        return ""
    common_lr = statistics.mode(chosen.values())
    others = [f"{task if task != 'WIC' else 'WiC'} {lr:g}" for task, lr in chosen.items() if lr != common_lr]
    return "; ".join([f"lr {common_lr:g}", *others])


def tables():
    """The study page's tables, as Markdown, from docs/study/ alone."""
    lines = ["| method | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for row in ROWS:
        label = {"icl": "ICL (32 demonstrations)", "FT": "FT (AdamW, 5 epochs)"}.get(row, row)
        chosen = rates(row) if row in (*ZO_METHODS, "FT") else ""
        label = label[:-1] + f"; {chosen})" if chosen and label.endswith(")") else label
        label = f"{label} ({chosen})" if chosen and not label.endswith(")") else label
        cells = [cell(accuracies(row, task), seeded=row != "zero-shot") for task in TASKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "The seed-0 learning-rate runs, from which the dev column (bold) chose the rates above:"]
    return [*lines, "", *selection_table(), "", *queries_table(), "", *precision_table()]


def by_seed(row, task):
    """{seed: accuracy in %} of a row's runs on `task` that have a result."""
    paths = {seed: DOCS / "results" / f"{row}-{task}-seed{seed}.json" for seed in SEEDS}
    return {seed: 100 * read_result(path)[0]["accuracy"] for seed, path in paths.items() if path.exists()}


def paired(these, those):
    """these − those, seed by seed, where both ran."""
    return [these[seed] - those[seed] for seed in these if seed in those]


def precision_table():
    """MeZO's bf16 weights (with a float32 master, a compensation buffer, or rounded stochastically) against
    float32 weights, the same rate and seeds, and the differences paired by seed."""
    lines = [
        f"MeZO's weights in bf16 and in float32, at the rate chosen in bf16, {STEPS} steps (bf16 with a "
        "float32 master copy: the MeZO runs above; compensated: a bf16 compensation buffer carries what "
        "each update's rounding left out; inference memory: the update rounded stochastically, today's "
        "default):",
        "",
        "| task | bf16, float32 master | bf16, compensated | bf16, inference memory | float32 "
        "| master minus float32 | compensated minus float32 | inference memory minus float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in PRECISION_TASKS:
        master = {seed: a for seed, a in by_seed("MeZO", task).items() if seed in PRECISION_SEEDS}
        bf16 = [master, by_seed("MeZO-compensated", task), by_seed("MeZO-rounded", task)]
        full = by_seed("MeZO-float32", task)
        accuracy = [cell(list(runs.values())) for runs in (*bf16, full)]
        differences = [cell(paired(runs, full)) for runs in bf16]
        lines.append(f"| {task} | " + " | ".join(accuracy + differences) + " |")
    return lines


def queries_table():
    """One direction a step against QUERIES at the same number of forward passes and rate, and the
    difference paired by seed."""
    lines = [
        f"Several directions a step at equal forward passes ({STEPS} steps of one direction against "
        f"{STEPS // QUERIES} steps of {QUERIES}, the rate chosen for one):",
        "",
        f"| task | method | 1 direction, {STEPS} steps | {QUERIES} directions, {STEPS // QUERIES} steps "
        f"| {QUERIES} minus 1, paired by seed |",
        "|---|---|---|---|---|",
    ]
    pair_rows = []
    for task in QUERY_TASKS:
        for method in QUERY_METHODS:
            one, several = by_seed(method, task), by_seed(f"{method}-q{QUERIES}", task)
            cells = [cell(list(one.values())), cell(list(several.values())), cell(paired(several, one))]
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
            pair_rows.append(pair_row(task, method))
    pair_rows = [row for row in pair_rows if row]
    evaluations = 2 * QUERIES
    if pair_rows:
        lines += [
            "",
            f"Wall time of seed 0's {QUERIES}-direction run with a step's {evaluations} evaluations as one "
            f"forward of the batch {evaluations} times (`--zo_batched_pair`) and as {evaluations} forwards: "
            "the two runs once more, started together on one machine, one thread each (training includes "
            "its dev evaluations; the whole run adds loading and the final evaluation):",
            "",
            f"| task | method | training, {evaluations} forwards | training, one forward of "
            f"{evaluations}B rows | one / separate | whole run (separate / one) "
            "| accuracy (separate / one) |",
            "|---|---|---|---|---|---|---|",
            *pair_rows,
        ]
    return lines


def pair_row(task, method):
    """The timed runs (timed_runs) with and without the batched pair: training time (dev evaluations
    included) and the whole run's (with the final evaluation, the same for both)."""
    names = [timed(method, task, variant) for variant in ("", "-pair")]
    paths = [DOCS / "results" / f"{name}.json" for name in names]
    if not all(path.exists() for path in paths):
        return None
    runs = [read_result(path) for path in paths]
    accuracy = " / ".join(f"{100 * metrics['accuracy']:.1f}" for metrics, _ in runs)
    machines = [machines_of(name) for name in names]
    if machines[0] != machines[1]:  # a wall time compares with another only on the same kind of machine
        return f"| {task} | {method} | not comparable: {machines[0]} / {machines[1]} | | | | {accuracy} |"
    training = [train_runtime(name) / 60 for name in names]
    whole = " / ".join(f"{wall_time(name, run)[0]:.1f}" for name, (_, run) in zip(names, runs, strict=True))
    return (
        f"| {task} | {method} | {training[0]:.1f} min | {training[1]:.1f} min | "
        f"{training[1] / training[0]:.2f} | {whole} min | {accuracy} |"
    )


def train_runtime(name):
    """Seconds a finished run trained (HF's train_runtime: its last attempt), from its log."""
    history = json.loads((DOCS / "logs" / f"{name}.json").read_text())
    return next(entry["train_runtime"] for entry in history if "train_runtime" in entry)


def machines_of(name):
    """The machines a finished run's attempts ran on, as one string ('' where not recorded)."""
    return ", ".join((recorded_wall_time(name) or {}).get("machines", []))


def command_tables(opts):
    """Print the tables and write them into docs/study/README.md between its markers; the figure only with
    --figure (it is committed: redrawing it changes its bytes)."""
    text = "\n".join(tables())
    print(text)
    page = DOCS / "README.md"
    if page.exists():
        before, rest = page.read_text().split(TABLES_BEGIN)
        after = rest.split(TABLES_END)[1]
        page.write_text(f"{before}{TABLES_BEGIN}\n{text}\n{TABLES_END}{after}")
    if getattr(opts, "figure", False):
        figure(DOCS / "curves.png")


def selection_table():
    """Every learning-rate run on seed 0 so far: dev accuracy (what selects), accuracy and wall time."""
    lines = ["| task | method | lr | dev (100) | accuracy (validation) | final training loss | wall time |"]
    lines.append("|---|---|---|---|---|---|---|")
    marked = False
    for task in TASKS:
        for method in [*ZO_METHODS, "FT"]:
            for lr in grid(method):
                path = DOCS / "results" / f"{selection(task, method, lr)}.json"
                if not path.exists():
                    continue
                metrics, run = read_result(path)
                minutes, attempts, float32 = wall_time(selection(task, method, lr), run)
                resumed = f" ({attempts} attempts)" if attempts > 1 else ""
                marked |= float32
                dev = f"{100 * metrics['dev_accuracy']:.0f}"
                dev = f"**{dev}**" if chosen_lr(task, method) == lr else dev
                lines.append(
                    f"| {task} | {method} | {lr:g} | {dev} | "
                    f"{100 * metrics['accuracy']:.1f} | {run.get('train_loss_last_logged'):.3f} | "
                    f"{minutes:.0f} min{resumed}{' †' if float32 else ''} |"
                )
    if marked:
        lines += ["", "† made, at least in part, on a CPU without bf16 matrix instructions: float32 products"]
    return lines


def curves(name):
    path = DOCS / "logs" / f"{name}.json"
    if not path.exists():
        return None
    history = json.loads(path.read_text())
    loss = [(e["step"], e["loss"]) for e in history if "loss" in e]
    dev = [(e["step"], e["eval_accuracy"]) for e in history if "eval_accuracy" in e]
    return loss, dev


def plotted(task):
    """(label, curves) per method: its seeds at the chosen rate (mean ± std over seeds) or, while the
    selection is still running, each seed-0 rate that has finished."""
    for method in ZO_METHODS:
        found = [c for c in (curves(f"{method}-{task}-seed{s}") for s in SEEDS) if c]
        if found:
            yield f"{method} (n={len(found)})", found
            continue
        for lr in LR_GRID:
            found = curves(selection(task, method, lr))
            if found:
                yield f"{method} lr {lr:g} (seed 0)", [found]


def figure(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [task for task in TASKS if any(plotted(task))]  # while the study runs: the tasks begun
    if not tasks:
        return
    figure, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    panels = [(0, "training loss, mean of 50 steps", 5), (1, "dev accuracy (100 samples)", 1)]
    for column, task in enumerate(tasks):
        for label, found in plotted(task):
            for row, (index, title, window) in enumerate(panels):
                series = [np.array(c[index]) for c in found]
                length = min(len(s) for s in series)
                # A batch of 8 makes each logged loss noisy: average over `window` logs, then over seeds.
                kernel = np.ones(window) / window
                steps = series[0][window - 1 : length, 0] * 2  # two forward passes a step
                values = np.stack([np.convolve(s[:length, 1], kernel, mode="valid") for s in series])
                mean, std = values.mean(0), values.std(0)
                axis = axes[row][column]
                axis.plot(steps, mean, label=label)
                axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
                axis.set(title=f"{task}: {title}", xlabel="forward passes")
                axis.grid(alpha=0.3)
                axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(path)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run", "list", "tables"])
    parser.add_argument("--only", default="", help="only the runs whose name contains this text")
    parser.add_argument("--skip", default="", help="not the runs whose name contains this text")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each run (0: its default)")
    parser.add_argument("--figure", action="store_true", help="tables: also redraw docs/study/curves.png")
    opts = parser.parse_args()
    {"run": command_run, "list": command_list, "tables": command_tables}[opts.command](opts)


if __name__ == "__main__":
    main()
