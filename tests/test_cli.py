"""run_lozo.py end to end: evaluation (zero-shot and in-context), training with every trainer, and usage
errors, on the real task data with tiny random models and the offline SmolLM2-135M.

Most runs call `run_lozo.main([...])` in-process inside a temporary working directory (the result/ folder
lands there); a few run the script as a subprocess where the exit status and the raw stderr matter.
"""

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import run_lozo
import tasks
import utils
from LOZOtrainer import ZOOptimizer
from metrics import calculate_metric
from utils import encode_prompt

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_lozo.py"
FOLDERS = {"SST2": "sst2", "SQuAD": "squad", "CB": "cb"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test machine's cores are shared: one intra-op thread is faster than two fighting ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(tmp_path, monkeypatch, data_dir):
    """`cli(*argv)` runs main() in-process with tmp_path as working directory and the real data folder
    taken from $LOZO_DATA_DIR (a --data_dir argument overrides it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(data_dir))
    return lambda *argv: run_lozo.main([str(arg) for arg in argv])


@pytest.fixture
def predictions(monkeypatch):
    """Records every prediction, one at a time (Framework.one_step_pred) or batched (batch_pred), as (demo
    ids, eval sample id, Prediction)."""
    calls = []
    one_at_a_time, batched = run_lozo.Framework.one_step_pred, run_lozo.Framework.batch_pred

    def record(pairs, found):
        calls.extend(
            ([d.id for d in demos], sample.id, p) for (demos, sample), p in zip(pairs, found, strict=True)
        )
        return found

    monkeypatch.setattr(
        run_lozo.Framework,
        "one_step_pred",
        lambda self, *pair: record([pair], [one_at_a_time(self, *pair)])[0],
    )
    monkeypatch.setattr(
        run_lozo.Framework, "batch_pred", lambda self, pairs: record(pairs, batched(self, pairs))
    )
    return calls


@pytest.fixture
def trainings(monkeypatch):
    """Records every Framework.train call as (train samples, dev samples, the trainer it returned)."""
    calls = []
    original = run_lozo.Framework.train

    def spy(self, train_samples, dev_samples):
        trainer = original(self, train_samples, dev_samples)
        calls.append((train_samples, dev_samples, trainer))
        return trainer

    monkeypatch.setattr(run_lozo.Framework, "train", spy)
    return calls


@cache
def row_count(data_dir, task_name, split):
    """Rows of a split, counted straight from the jsonl file (blank lines hold no row)."""
    folder = Path(data_dir) / FOLDERS[task_name]
    path = folder / f"{split}.jsonl"
    opener = open
    if not path.exists():
        path, opener = folder / f"{split}.jsonl.gz", gzip.open
    with opener(path, "rb") as lines:
        return sum(1 for line in lines if line.strip())


def mezo_subset(rows, seed, num):
    """MeZO's seeded subset: the first `num` row positions of np.random.seed(seed); permutation(rows)."""
    return np.random.RandomState(seed).permutation(rows)[:num].tolist()


def result_files(folder):
    return sorted(path.relative_to(folder).as_posix() for path in Path(folder).rglob("*.json"))


def read_json(path):
    """The metrics of a result file (what produced them is under "run", see test_results_carry_their_run)."""
    return utils.read_result(path)[0]


def accuracy_of(calls):
    return float(np.mean([p.correct_candidate == p.predicted_candidate for _, _, p in calls]))


# ---------------------------------------------------------------------------------------------------------
# 1. Zero-shot and in-context evaluation with the tiny random models

EVAL_CASES = {
    # id: (task, extra args, expected result files, demo-set seeds or "per-eval")
    "sst2-zero-shot": ("SST2", ["--num_train", 0, "--num_eval", 8], ["onetrainpereval"], "per-eval"),
    "sst2-icl-per-eval": (
        "SST2",
        ["--num_train", 4, "--num_eval", 8],
        ["ntrain4-onetrainpereval"],
        "per-eval",
    ),
    "sst2-icl-seed0": (
        "SST2",
        ["--num_train", 4, "--num_eval", 8, "--train_set_seed", 0],
        ["ntrain4-trainset0"],
        [0],
    ),
    "sst2-icl-two-sets": (
        "SST2",
        ["--num_train", 4, "--num_eval", 8, "--num_train_sets", 2],
        ["ntrain4-trainset0", "ntrain4-trainset1"],
        [0, 1],
    ),
    "squad-zero-shot": ("SQuAD", ["--num_train", 0], ["onetrainpereval"], "per-eval"),
    "squad-icl-per-eval": ("SQuAD", ["--num_train", 2], ["ntrain2-onetrainpereval"], "per-eval"),
    "squad-icl-seed0": ("SQuAD", ["--num_train", 2, "--train_set_seed", 0], ["ntrain2-trainset0"], [0]),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluation_writes_mezo_result_file(case, cli, predictions, tmp_path, tiny_opt_dir, data_dir):
    task_name, extra, suffixes, seeds = EVAL_CASES[case]
    generation = task_name == "SQuAD"
    num_eval = 3 if generation else 8
    extra = ["--num_eval", num_eval, "--max_new_tokens", 5, *extra] if generation else extra
    assert cli("--task_name", task_name, "--model_name", tiny_opt_dir, *extra) == 0

    stem = f"{task_name}-tiny-opt-sampleeval{num_eval}"
    expected = [f"result/{stem}-{suffix}.json" for suffix in suffixes]
    assert result_files(tmp_path) == sorted(expected)

    # Which demonstrations and eval samples were used, as MeZO picks them (ids are row positions).
    num_train = extra[extra.index("--num_train") + 1]
    train_rows, valid_rows = (row_count(data_dir, task_name, s) for s in ("train", "validation"))
    if seeds == "per-eval":
        demo_seeds = np.random.RandomState(0).randint(0, 10000, num_eval).tolist()
        runs = [
            (
                mezo_subset(valid_rows, 0, num_eval),
                [mezo_subset(train_rows, s, num_train) for s in demo_seeds],
            )
        ]
    else:
        runs = [
            (mezo_subset(valid_rows, s, num_eval), [mezo_subset(train_rows, s, num_train)] * num_eval)
            for s in seeds
        ]
    expected_calls = [
        (demos, eval_id)
        for eval_ids, demo_sets in runs
        for eval_id, demos in zip(eval_ids, demo_sets, strict=True)
    ]
    assert [(demos, eval_id) for demos, eval_id, _ in predictions] == expected_calls

    metric = "f1" if generation else "accuracy"
    for run_index, path in enumerate(expected):
        metrics = read_json(tmp_path / path)
        assert list(metrics) == [metric]
        assert 0.0 <= metrics[metric] <= 1.0
        calls = predictions[run_index * num_eval : (run_index + 1) * num_eval]
        if generation:
            assert all(isinstance(p.predicted_candidate, str) for _, _, p in calls)
            assert all(isinstance(p.correct_candidate, list) for _, _, p in calls)
            assert metrics[metric] == pytest.approx(calculate_metric([p for _, _, p in calls], "f1"))
        else:
            assert metrics[metric] == pytest.approx(accuracy_of(calls))


def test_llama_zero_shot_runs(cli, predictions, tmp_path, tiny_llama_dir):
    assert cli("--task_name", "SST2", "--model_name", tiny_llama_dir, "--num_eval", 8) == 0
    assert result_files(tmp_path) == ["result/SST2-tiny-llama-sampleeval8-onetrainpereval.json"]
    metrics = read_json(tmp_path / "result/SST2-tiny-llama-sampleeval8-onetrainpereval.json")
    assert metrics["accuracy"] == pytest.approx(accuracy_of(predictions))
    assert len(predictions) == 8 and all(demos == [] for demos, _, _ in predictions)


def test_model_path_and_tag_name_the_result(cli, tmp_path, tiny_opt_dir):
    args = ["--task_name", "SST2", "--num_eval", 4, "--model_name", "facebook/opt-13b"]
    assert cli(*args, "--model_path", tiny_opt_dir, "--tag", "mine") == 0
    assert result_files(tmp_path) == ["result/SST2-opt-13b-sampleeval4-mine-onetrainpereval.json"]


def test_result_file_option_replaces_the_default_path(cli, tmp_path, tiny_opt_dir):
    args = ["--task_name", "SST2", "--num_eval", 4, "--model_name", tiny_opt_dir]
    assert cli(*args, "--result_file", "elsewhere/metrics.json") == 0
    assert result_files(tmp_path) == ["elsewhere/metrics.json"]
    assert 0.0 <= read_json(tmp_path / "elsewhere/metrics.json")["accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# 2. The real SmolLM2-135M


def test_smollm2_zero_shot_sst2(cli, predictions, tmp_path, smollm2_dir):
    assert cli("--task_name", "SST2", "--model_name", smollm2_dir, "--num_eval", 16) == 0
    path = tmp_path / "result" / "SST2-SmolLM2-135M-sampleeval16-onetrainpereval.json"
    accuracy = read_json(path)["accuracy"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert len(predictions) == 16
    assert accuracy == pytest.approx(accuracy_of(predictions))


def direct_mean_option_log_probs(model, encodings, option_lens):
    """Per candidate, unpadded: mean log-prob of its last option_len tokens, each given all tokens before."""
    scores = []
    with torch.no_grad():
        for ids, option_len in zip(encodings, option_lens, strict=True):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            positions = range(len(ids) - option_len, len(ids))
            scores.append(float(np.mean([log_probs[i - 1, ids[i]].item() for i in positions])))
    return scores


def test_smollm2_icl_scoring_picks_the_best_mean_option_log_prob(smollm2_dir, data_dir, tmp_path):
    argv = ["--task_name", "SST2", "--model_name", str(smollm2_dir), "--data_dir", str(data_dir)]
    args = run_lozo.parse_args(
        [*argv, "--num_train", "4", "--train_set_seed", "0", "--output_dir", str(tmp_path)]
    )
    task = tasks.get_task(args.task_name, args.data_dir)
    framework = run_lozo.Framework(args, task)
    demos = task.sample_subset("train", seed=0, num=4)
    # Valid rows 1 and 4: the model prefers "terrible" on one and (wrongly, gold is 0) "great" on the other.
    picked = set()
    for position in (1, 4):
        sample = task.valid_samples[position]
        encodings, option_lens = encode_prompt(
            task, framework.template, demos, sample, framework.tokenizer, max_length=args.max_length
        )
        prompt = framework.tokenizer.decode(encodings[0])
        assert all(demo.data["sentence"].strip() in prompt for demo in demos)
        scores = direct_mean_option_log_probs(framework.model, encodings, option_lens)
        assert abs(scores[0] - scores[1]) > 1e-3  # a clear winner, so the argmax is well defined
        batched = [lp.mean().item() for lp in framework.option_log_probs(encodings, option_lens)]
        assert batched == pytest.approx(scores, abs=1e-4)

        prediction = framework.one_step_pred(demos, sample)
        assert prediction.predicted_candidate == int(np.argmax(scores))
        assert prediction.correct_candidate == sample.candidates.index(sample.correct_candidate)
        picked.add(prediction.predicted_candidate)
    assert picked == {0, 1}


@pytest.mark.parametrize("task_name", ["WIC", "Copa"])
def test_smollm2_batched_scoring_gives_the_scores_of_one_sample_at_a_time(
    task_name, smollm2_dir, data_dir, tmp_path
):
    """--per_device_eval_batch_size 4: four samples a forward, zero-shot and with a demonstration set each
    (MeZO's ICL), each candidate scored as one sample at a time scores it (float32). WiC's options are one
    token (one packed row a sample), Copa's several (a row a candidate)."""
    argv = ["--task_name", task_name, "--model_name", str(smollm2_dir), "--data_dir", str(data_dir)]
    args = run_lozo.parse_args([*argv, "--per_device_eval_batch_size", "4", "--output_dir", str(tmp_path)])
    task = tasks.get_task(args.task_name, args.data_dir)
    framework = run_lozo.Framework(args, task)
    samples = task.valid_samples[:8]
    demo_sets = [[]] * 4 + [task.sample_subset("train", seed=seed, num=2) for seed in range(4)]
    pairs = list(zip(demo_sets, samples, strict=True))
    expected = [
        [lp.mean().item() for lp in framework.option_log_probs(*framework.encode(*pair))] for pair in pairs
    ]
    forwards = []
    framework.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(1), with_kwargs=True
    )
    scored = framework.batch_scores(pairs[:4]) + framework.batch_scores(pairs[4:])
    assert len(forwards) == 2
    for got, want in zip(scored, expected, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-4)

    gold = [run_lozo.correct_index(sample) for sample in samples]
    accuracy = np.mean([np.argmax(s) == g for s, g in zip(expected, gold, strict=True)])
    assert 0 < accuracy < 1  # the comparison below can tell right from wrong predictions
    assert framework.evaluate(demo_sets, samples, one_train_set_per_eval_sample=True)["accuracy"] == accuracy
    assert len(forwards) == 4


def test_batching_only_where_the_score_is_the_plain_mean_log_prob(tiny_opt_dir, data_dir, tmp_path):
    """Generation, calibrated scores and a demonstration set shared by all samples (whose prompt the KV
    cache runs once) evaluate one sample at a time; the rest --per_device_eval_batch_size at a time."""

    def framework(*extra, task_name="SST2"):
        argv = ["--task_name", task_name, "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir)]
        args = run_lozo.parse_args([*argv, *extra, "--output_dir", str(tmp_path)])
        return run_lozo.Framework(args, tasks.get_task(task_name, str(data_dir)))

    plain = framework()
    assert plain.samples_per_forward(shared_demos=False) == 8  # HF's default --per_device_eval_batch_size
    assert plain.samples_per_forward(shared_demos=True) == 1
    assert framework("--per_device_eval_batch_size", "1").samples_per_forward(shared_demos=False) == 1
    assert framework("--sfc").samples_per_forward(shared_demos=False) == 1
    assert framework("--icl_sfc").samples_per_forward(shared_demos=False) == 1
    assert framework(task_name="SQuAD").samples_per_forward(shared_demos=False) == 1


def test_smollm2_icl_runs_the_shared_demonstrations_once(smollm2_dir, data_dir, tmp_path):
    argv = ["--task_name", "SST2", "--model_name", str(smollm2_dir), "--data_dir", str(data_dir)]
    args = run_lozo.parse_args([*argv, "--train_set_seed", "0", "--output_dir", str(tmp_path)])
    task = tasks.get_task(args.task_name, args.data_dir)
    framework = run_lozo.Framework(args, task)
    demos = task.sample_subset("train", seed=0, num=8)
    samples = task.valid_samples[:6]
    prompts = [
        encode_prompt(task, framework.template, demos, s, framework.tokenizer, max_length=args.max_length)
        for s in samples
    ]
    expected = [direct_mean_option_log_probs(framework.model, *prompt) for prompt in prompts]
    forwarded = []  # ids each forward runs, per sample
    framework.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwarded[-1].append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    for (encodings, option_lens), scores in zip(prompts, expected, strict=True):
        forwarded.append([])
        batched = [lp.mean().item() for lp in framework.option_log_probs(encodings, option_lens)]
        assert batched == pytest.approx(scores, abs=1e-4)
    prompt_lengths = [len(encodings[0]) for encodings, _ in prompts]
    assert sum(forwarded[0]) >= prompt_lengths[0]  # the first sample runs its whole prompt
    for ids, length in zip(forwarded[1:], prompt_lengths[1:], strict=True):
        assert sum(ids) < length / 2  # the others: only their own sentence and the candidates' words

    gold = [run_lozo.correct_index(sample) for sample in samples]
    accuracy = np.mean([np.argmax(s) == g for s, g in zip(expected, gold, strict=True)])
    assert framework.evaluate(demos, samples)["accuracy"] == pytest.approx(accuracy)
    assert framework.kept_prompt is None  # the next evaluation may see other weights


# ---------------------------------------------------------------------------------------------------------
# 3. Bad input: exit 2, one `error:` line naming the problem, nothing loaded, nothing written


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, data_dir):
    """Data folders for CB: one holding only train.jsonl, one whose train.jsonl has a broken line 3."""
    only_train = tmp_path_factory.mktemp("only-train")
    (only_train / "cb").mkdir()
    shutil.copyfile(data_dir / "cb" / "train.jsonl", only_train / "cb" / "train.jsonl")
    corrupt = tmp_path_factory.mktemp("corrupt")
    (corrupt / "cb").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copyfile(data_dir / "cb" / name, corrupt / "cb" / name)
    lines = (corrupt / "cb" / "train.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"premise": "cut off in the mid\n'
    (corrupt / "cb" / "train.jsonl").write_text("".join(lines))
    return {"only_train": only_train, "corrupt": corrupt}


# id: (arguments, words the error line must contain); {only_train}, {corrupt}, {tmp} are filled in.
BAD_INPUTS = {
    "unknown-task": (["--task_name", "SST3"], ["unknown task", "SST3"]),
    "missing-data-folder": (["--data_dir", "/nonexistent"], ["/nonexistent/sst2"]),
    "missing-split-file": (["--task_name", "CB", "--data_dir", "{only_train}"], ["cb/validation.jsonl"]),
    "corrupt-line": (
        ["--task_name", "CB", "--data_dir", "{corrupt}"],
        ["{corrupt}/cb/train.jsonl", "line 3"],
    ),
    "unknown-model": (["--model_name", "{tmp}/no-such-model"], ["{tmp}/no-such-model"]),
    "unknown-trainer": (["--trainer", "foo"], ["--trainer", "foo"]),
    "rank-0": (["--rank_r", "0"], ["--rank_r"]),
    "step-interval-0": (["--step_interval", "0"], ["--step_interval"]),
    "zo-eps-0": (["--zo_eps", "0"], ["--zo_eps"]),
    "beta1-1": (["--beta1", "1.0"], ["--beta1"]),
    "merge-periods-0": (["--merge_periods", "0"], ["--merge_periods"]),
    "queries-0": (["--trainer", "zo", "--zo_queries", "0"], ["--zo_queries"]),
    "compensated-lozo": (["--trainer", "LOZO", "--zo_compensated"], ["--zo_compensated", "--trainer zo"]),
    "pair-without-zo": (["--trainer", "regular", "--zo_batched_pair"], ["--zo_batched_pair", "--trainer zo"]),
    "pair-in-place": (
        ["--trainer", "zo", "--zo_in_place", "--zo_batched_pair"],
        ["--zo_in_place", "--zo_batched_pair"],
    ),
    "queries-in-place": (["--trainer", "zo", "--zo_in_place", "--zo_queries", "4"], ["--zo_queries"]),
    "compiled-lozo": (
        ["--trainer", "LOZO", "--torch_compile", "--train_set_seed", "0"],
        ["--torch_compile", "LOZO"],
    ),
    "train-sets-with-a-trainer": (
        ["--trainer", "zo", "--num_train_sets", "3"],
        ["--num_train_sets", "--train_set_seed"],
    ),
    "in-place-lozo": (
        ["--trainer", "LOZO", "--zo_in_place", "--train_set_seed", "0"],
        ["--zo_in_place", "--trainer zo"],
    ),
    "trajectory-without-zo": (
        ["--trainer", "regular", "--zo_trajectory_checkpoints", "--train_set_seed", "0"],
        ["--zo_trajectory_checkpoints", "--trainer zo"],
    ),
    "trajectory-with-best-model": (
        [
            "--trainer",
            "LOZO",
            "--zo_trajectory_checkpoints",
            "--train_set_seed",
            "0",
            "--eval_strategy",
            "steps",
            "--save_strategy",
            "steps",
            "--load_best_model_at_end",
        ],
        ["--zo_trajectory_checkpoints", "--load_best_model_at_end"],
    ),  # fmt: skip
    "trajectory-in-place-accumulating": (
        [
            "--trainer",
            "zo",
            "--zo_in_place",
            "--zo_trajectory_checkpoints",
            "--train_set_seed",
            "0",
            "--gradient_accumulation_steps",
            "2",
        ],
        ["--zo_trajectory_checkpoints", "--zo_in_place", "--gradient_accumulation_steps"],
    ),  # fmt: skip
    "unknown-lozo-optimizer": (["--lozo_optimizer", "adam"], ["--lozo_optimizer", "adam"]),
    "non-diff-on-sst2": (["--non_diff", "--trainer", "zo"], ["--non_diff", "SST2"]),
    "classification-on-squad": (
        ["--task_name", "SQuAD", "--train_as_classification"],
        ["--train_as_classification"],
    ),
    "training-without-a-train-set": (["--trainer", "LOZO"], ["--train_set_seed"]),
    "dev-without-training": (["--num_dev", "10", "--train_set_seed", "0"], ["--num_dev", "--trainer none"]),
    "mixed-precision-with-zo": (
        ["--trainer", "zo", "--train_set_seed", "0", "--fp16"],
        ["--fp16", "--load_float16"],
    ),
    "lora-with-prefix": (["--lora", "--prefix_tuning"], ["--lora", "--prefix_tuning"]),
    "lora-r-0": (["--lora", "--lora_r", "0"], ["--lora_r"]),
    "num-prefix-0": (["--prefix_tuning", "--num_prefix", "0"], ["--num_prefix"]),
    "probe-as-classification": (
        ["--linear_probing", "--train_as_classification", "--train_set_seed", "0"],
        ["--linear_probing", "--train_as_classification"],
    ),
    "probe-with-a-trainer": (
        ["--linear_probing", "--trainer", "zo", "--train_set_seed", "0"],
        ["--linear_probing", "--trainer zo"],
    ),
    "probe-on-copa": (["--linear_probing", "--task_name", "Copa", "--train_set_seed", "0"], ["Copa"]),
    "adapter-with-lora": (["--lora", "--load_adapter", "{tmp}"], ["--load_adapter", "--lora"]),
    "mode-without-a-trainer": (
        ["--lora", "--train_set_seed", "0"],
        ["--lora", "--trainer", "--load_adapter"],
    ),
    "probe-with-calibration": (
        ["--linear_probing", "--sfc", "--train_set_seed", "0"],
        ["--linear_probing", "--sfc"],
    ),
    "adapter-folder-missing": (["--load_adapter", "{tmp}/none"], ["--load_adapter {tmp}/none"]),
    "real-act-init-with-reparam": (
        ["--prefix_tuning", "--no_reparam", "False"],
        ["--prefix_init_by_real_act", "--no_reparam"],
    ),
    "unreported-best-metric": (
        ["--trainer", "zo", "--train_set_seed", "0", "--metric_for_best_model", "loss"],
        ["--metric_for_best_model", "accuracy"],
    ),
}


def bad_input(case, bad_data, tmp, model_dir):
    argv, words = BAD_INPUTS[case]
    paths = {name: str(path) for name, path in bad_data.items()} | {"tmp": str(tmp)}
    argv = [arg.format(**paths) for arg in argv]
    if "--model_name" not in argv:
        argv += ["--model_name", str(model_dir)]
    return argv, [word.format(**paths) for word in words]


def check_error_output(stderr, words):
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: ")
    for word in words:
        assert word in lines[-1]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(case, cli, capsys, monkeypatch, tmp_path, bad_data, tiny_opt_dir):
    argv, words = bad_input(case, bad_data, tmp_path, tiny_opt_dir)
    if case != "unknown-model":
        monkeypatch.setattr(run_lozo, "load_model", no_model)
    assert cli(*argv) == 2
    check_error_output(capsys.readouterr().err, words)
    assert result_files(tmp_path) == []


SUBPROCESS_CASES = ("unknown-task", "corrupt-line", "unknown-model")


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory, bad_data, data_dir, tiny_opt_dir):
    """The script as a user runs it, for a few bad inputs, all started at once to overlap their imports."""
    env = os.environ | {tasks.DATA_DIR_ENV: str(data_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for case in SUBPROCESS_CASES:
        cwd = tmp_path_factory.mktemp(f"cli-{case}")
        argv, words = bad_input(case, bad_data, cwd, tiny_opt_dir)
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[case] = (process, cwd, words)
    yield runs
    for process, _, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_script_exits_2_with_one_error_line_and_no_traceback(case, script_runs):
    process, cwd, words = script_runs[case]
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    check_error_output(stderr, words)
    assert result_files(cwd) == []


# ---------------------------------------------------------------------------------------------------------
# 4. A train set larger than the split shrinks, with a warning


def test_train_set_larger_than_the_split_warns_and_trains(cli, trainings, caplog, tmp_path, tiny_opt_dir):
    argv = ["--task_name", "CB", "--model_name", tiny_opt_dir, "--num_train", 1000, "--num_dev", 20]
    argv += ["--train_set_seed", 0, "--trainer", "LOZO", "--max_steps", 1, "--num_eval", 4]
    with caplog.at_level(logging.INFO):
        assert cli(*argv, "--output_dir", tmp_path / "out") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about_size = [message for message in warnings if "250" in message]
    assert len(about_size) == 1, warnings
    assert "\n" not in about_size[0]
    # All 250 CB train rows are used, in MeZO's seed-0 order: the last 20 as dev, the 230 before to train.
    [(train_samples, dev_samples, trainer)] = trainings
    order = mezo_subset(250, 0, 250)
    assert [s.data["idx"] for s in train_samples] == order[:230]
    assert [s.data["idx"] for s in dev_samples] == order[230:]
    assert trainer.state.global_step == 1
    assert trainer.zo_optimizer.zo_step == 1
    metrics = read_json(tmp_path / "result/CB-tiny-opt-sampleeval4-ntrain1000-ndev20-trainset0.json")
    assert set(metrics) == {"accuracy", "dev_accuracy"}


def test_training_with_no_eval_writes_no_result(cli, trainings, tmp_path, tiny_opt_dir):
    argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_train", 4, "--train_set_seed", 0]
    assert cli(*argv, "--trainer", "zo", "--max_steps", 1, "--no_eval", "--output_dir", tmp_path / "out") == 0
    [(_, _, trainer)] = trainings
    assert trainer.state.global_step == 1
    assert result_files(tmp_path / "result") == []  # as MeZO: nothing evaluated, nothing written


def test_dev_set_as_large_as_the_split_is_not_a_crash(cli, capsys, tmp_path, tiny_opt_dir):
    argv = ["--task_name", "CB", "--model_name", tiny_opt_dir, "--num_train", 10, "--num_dev", 300]
    argv += ["--train_set_seed", 0, "--trainer", "LOZO", "--max_steps", 1, "--num_eval", 2]
    assert cli(*argv, "--output_dir", tmp_path / "out") == 2
    check_error_output(capsys.readouterr().err, ["num_dev"])


# ---------------------------------------------------------------------------------------------------------
# 5. Training through the command line


TRAINERS = {
    # id: (arguments, (low-rank directions, LOZO-M momentum)) or None for first-order training
    "zo": (["--trainer", "zo"], (False, None)),
    "LOZO": (["--trainer", "LOZO"], (True, None)),
    "LOZO-M": (["--trainer", "LOZO", "--lozo_optimizer", "sgdm"], (True, 0.9)),
    "regular": (["--trainer", "regular"], None),
}


@pytest.mark.parametrize("case", list(TRAINERS))
def test_training_end_to_end(case, cli, trainings, tmp_path, tiny_opt_dir):
    trainer_args, zo_kind = TRAINERS[case]
    out = tmp_path / "out"
    argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, *trainer_args, "--max_steps", 3]
    argv += ["--per_device_train_batch_size", 4, "--num_train", 16, "--num_dev", 4, "--num_eval", 8]
    argv += ["--train_set_seed", 0, "--output_dir", out, "--save_model", "--eval_strategy", "steps"]
    assert cli(*argv, "--eval_steps", 2) == 0

    assert result_files(tmp_path / "result") == ["SST2-tiny-opt-sampleeval8-ntrain16-ndev4-trainset0.json"]
    metrics = read_json(tmp_path / "result/SST2-tiny-opt-sampleeval8-ntrain16-ndev4-trainset0.json")
    assert set(metrics) == {"accuracy", "dev_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())

    [(train_samples, dev_samples, trainer)] = trainings
    assert (len(train_samples), len(dev_samples)) == (16, 4)
    assert trainer.state.global_step == 3
    if zo_kind is None:
        assert trainer.zo_optimizer is None
    else:
        assert isinstance(trainer.zo_optimizer, ZOOptimizer)
        assert (trainer.zo_optimizer.low_rank, trainer.zo_optimizer.beta) == zo_kind
        assert trainer.zo_optimizer.zo_step == 3

    # Evaluation during training: the task metric on the dev samples, logged every 2 steps.
    evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evals][:1] == [2]
    assert all(0.0 <= entry["eval_accuracy"] <= 1.0 for entry in evals)
    if evals[-1]["step"] == 3:  # evaluated at the end too: the same model and dev samples as dev_accuracy
        assert evals[-1]["eval_accuracy"] == metrics["dev_accuracy"]

    # --save_model: a loadable HF checkpoint holding the trained weights, which differ from the initial ones.
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    trained = {name: value.detach().cpu() for name, value in trainer.model.state_dict().items()}
    initial = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[name], trained[name]) for name in saved)
    assert any(not torch.equal(saved[name], initial[name]) for name in saved)
    tokenizers = [AutoTokenizer.from_pretrained(folder) for folder in (out, tiny_opt_dir)]
    assert len({tuple(t.encode(" great", add_special_tokens=False)) for t in tokenizers}) == 1


HALF_FLAGS = [("--load_bfloat16", torch.bfloat16), ("--load_float16", torch.float16)]


@pytest.mark.parametrize(("flag", "dtype"), HALF_FLAGS)
@pytest.mark.parametrize("fast", [True, False])
def test_half_precision_loads_as_asked_and_multiplies_in_float32_where_the_cpu_has_no_unit_for_it(
    flag, dtype, fast, cli, caplog, tiny_opt_dir, tmp_path
):
    """No silent float32: the weights are in the asked dtype. On a CPU without that dtype's matrix
    instructions (read from /proc/cpuinfo, simulated here both ways) the run says so in one line and its
    products (F.linear) run in float32 (utils.Float32Products; its result says so); else PyTorch's own."""
    loaded, products = [], []
    original, multiply = run_lozo.load_model, utils.Float32Products.__torch_function__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_lozo, "load_model", lambda args: loaded.append(original(args)) or loaded[-1])
        patch.setattr(utils, "cpu_lacks_fast_matmul", lambda wanted: not fast)
        patch.setattr(
            utils.Float32Products,
            "__torch_function__",
            lambda self, func, *rest: products.append(func) or multiply(self, func, *rest),
        )
        with caplog.at_level(logging.INFO):
            result = tmp_path / "result.json"
            argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 2, flag]
            assert cli(*argv, "--result_file", result) == 0
    assert {p.dtype for p in loaded[0].parameters()} == {dtype}
    lines = [r.getMessage() for r in caplog.records if "matrix instructions" in r.getMessage()]
    if fast or torch.cuda.is_available():
        assert lines == [] and products == []
    else:
        assert len(lines) == 1 and str(dtype).removeprefix("torch.") in lines[0]
        assert products.count(torch.nn.functional.linear) > 0
    assert json.loads(result.read_text())["run"]["float32_products"] == bool(products)


def test_cpu_flags_decide_which_half_precision_is_slow(monkeypatch):
    monkeypatch.setattr(utils, "cpu_flags", lambda: ["sse2", "avx512f", "avx512_bf16"])
    assert not utils.cpu_lacks_fast_matmul(torch.bfloat16) and utils.cpu_lacks_fast_matmul(torch.float16)
    monkeypatch.setattr(utils, "cpu_flags", lambda: ["amx_bf16", "amx_fp16"])
    assert not utils.cpu_lacks_fast_matmul(torch.float16)
    monkeypatch.setattr(utils, "cpu_flags", lambda: None)  # unknown (no /proc/cpuinfo): no warning
    assert not utils.cpu_lacks_fast_matmul(torch.float16)


def test_int8_without_a_gpu_is_a_one_line_error(cli, capsys, tmp_path, tiny_opt_dir):
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only machine")
    assert cli("--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 2, "--load_int8") == 2
    check_error_output(capsys.readouterr().err, ["--load_int8"])
    assert result_files(tmp_path / "result") == []


def test_lozo_settings_with_another_trainer_are_reported_as_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="run_lozo"):
        run_lozo.parse_args(["--trainer", "zo", "--rank_r", "4", "--train_set_seed", "0"])
    assert "--rank_r only apply to --trainer LOZO; ignored with --trainer zo" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="run_lozo"):
        run_lozo.parse_args(["--trainer", "LOZO", "--rank_r", "4", "--train_set_seed", "0"])
    assert "ignored" not in caplog.text


# ---- what a run tells and leaves behind ----


def test_results_carry_their_run(cli, tmp_path, tiny_opt_dir):
    """The metrics stay at the top level (older readers keep working); "run" says what produced them."""
    out = tmp_path / "out"
    argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--trainer", "LOZO", "--max_steps", 2]
    argv += ["--num_train", 16, "--num_dev", 4, "--num_eval", 8, "--train_set_seed", 0, "--output_dir", out]
    assert cli(*argv, "--learning_rate", 1e-3, "--logging_steps", 1) == 0
    path = tmp_path / "result/SST2-tiny-opt-sampleeval8-ntrain16-ndev4-trainset0.json"
    metrics, run = utils.read_result(path)
    assert set(metrics) == {"accuracy", "dev_accuracy"}
    # Paths as the user gave them, or relative to the working folder: no absolute path of this machine.
    assert (run["task"], run["model"], run["trainer"]) == ("SST2", os.path.relpath(tiny_opt_dir), "LOZO")
    settings = run["settings"]
    assert settings["learning_rate"] == 1e-3 and settings["zo_eps"] == 1e-3 and settings["rank_r"] == 2
    assert settings["step_interval"] == 50 and settings["seed"] == 42 and settings["max_steps"] == 2
    assert (
        settings["data_dir"] == os.path.relpath(os.environ[tasks.DATA_DIR_ENV])
        and not settings["load_bfloat16"]
    )
    assert run["samples"] == {"train set seed": 0, "eval": 8, "train": 16, "dev": 4}
    assert set(run["versions"]) == {"python", "torch", "transformers", "datasets", "accelerate", "peft"}
    assert torch.__version__.startswith(run["versions"]["torch"])
    assert run["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+changes)?", run["commit"])
    assert run["wall_time_s"] > 0 and np.isfinite(run["train_loss_last_logged"])
    assert run["log_history"] == os.path.relpath(out / "trainer_state.json") and os.path.isfile(
        run["log_history"]
    )
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~utils.current_umask()  # not mkstemp's 0600


def no_model(args):
    raise AssertionError("the model was loaded before the run was refused")


def test_a_run_never_replaces_another_runs_result(cli, capsys, monkeypatch, tmp_path, tiny_opt_dir):
    """MeZO's result names leave the method and its hyperparameters to --tag, so a LOZO run after a MeZO one
    on the same samples names the MeZO run's file: it stops before loading the model instead. The same run
    again, or one that differs only in where it writes and how it logs, replaces its own result."""
    base = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--max_steps", 1, "--num_train", 8]
    base += ["--num_eval", 4, "--train_set_seed", 0, "--output_dir", tmp_path / "out"]
    base += ["--save_strategy", "no"]
    zo = ["--trainer", "zo", "--learning_rate", 1e-3]
    mezo = [*base, *zo]
    assert cli(*mezo) == 0
    path = tmp_path / "result/SST2-tiny-opt-sampleeval4-ntrain8-trainset0.json"
    written = path.read_bytes()
    refused = {
        "the method": (["--trainer", "LOZO", "--learning_rate", 1e-3], "trainer 'zo' (here 'LOZO')"),
        "its learning rate": ([*zo, "--learning_rate", 1e-4], "learning_rate 0.001 (here 0.0001)"),
        "the train set": ([*zo, "--train_set_seed", 1], "train_set_seed 0 (here 1)"),
    }
    with monkeypatch.context() as patch:
        patch.setattr(run_lozo, "load_model", no_model)
        for differing, (argv, named) in refused.items():
            assert cli(*base, *argv) == 2, differing
            check_error_output(capsys.readouterr().err, [str(path.relative_to(tmp_path)), named, "--tag"])
            assert path.read_bytes() == written, differing
    assert cli(*base, "--trainer", "LOZO", "--learning_rate", 1e-3, "--tag", "lozo") == 0
    assert utils.read_result(path)[1]["settings"]["trainer"] == "zo"
    lozo = tmp_path / "result/SST2-tiny-opt-sampleeval4-ntrain8-lozo-trainset0.json"
    assert utils.read_result(lozo)[1]["settings"]["trainer"] == "LOZO"
    assert (
        cli(*mezo, "--logging_steps", 1, "--output_dir", tmp_path / "elsewhere", "--report_to", "none") == 0
    )
    assert utils.read_result(path)[1]["settings"]["logging_steps"] == 1  # its own result, replaced


def test_a_result_without_recorded_settings_is_not_replaced(cli, capsys, monkeypatch, tmp_path, tiny_opt_dir):
    path = tmp_path / "result/SST2-tiny-opt-sampleeval4-onetrainpereval.json"
    path.parent.mkdir()
    path.write_text('{"accuracy": 0.688}')  # written before results recorded their run
    monkeypatch.setattr(run_lozo, "load_model", no_model)
    assert cli("--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 4) == 2
    check_error_output(capsys.readouterr().err, ["settings cannot be read", "--result_file"])
    assert path.read_text() == '{"accuracy": 0.688}'


def test_a_named_result_file_gets_one_name_per_train_set():
    argv = ["--task_name", "SST2", "--num_train", 4, "--result_file", "out/icl.json"]
    args = run_lozo.parse_args([str(a) for a in [*argv, "--num_train_sets", 2]])
    assert run_lozo.result_paths(args) == ["out/icl-trainset0.json", "out/icl-trainset1.json"]
    args = run_lozo.parse_args([str(a) for a in [*argv, "--train_set_seed", 3]])
    assert run_lozo.result_paths(args) == ["out/icl.json"]


def test_the_commit_is_read_before_the_run_trains(tiny_opt_dir, data_dir, monkeypatch):
    """A long run records the commit of the code it started with, not of the tree it ends in."""
    read_at_start = []

    class Stop(Exception):
        pass

    def framework(*_):
        read_at_start.append(run_lozo.provenance.cache_info().currsize)
        raise Stop

    run_lozo.provenance.cache_clear()
    monkeypatch.setattr(run_lozo, "Framework", framework)
    with pytest.raises(Stop):
        argv = ["--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir)]
        run_lozo.run(run_lozo.parse_args(argv))
    assert read_at_start == [1]


def test_result_files_written_before_runs_were_recorded_still_load(tmp_path):
    (tmp_path / "old.json").write_text('{"accuracy": 0.688, "dev_accuracy": 0.71}')
    assert utils.read_result(tmp_path / "old.json") == ({"accuracy": 0.688, "dev_accuracy": 0.71}, {})


def test_every_run_ends_with_a_summary_of_metrics_and_files(cli, caplog, tmp_path, tiny_opt_dir):
    out = tmp_path / "out"
    argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--trainer", "zo", "--max_steps", 2]
    argv += ["--num_train", 8, "--num_eval", 4, "--train_set_seed", 0, "--output_dir", out, "--lora"]
    argv += ["--save_strategy", "steps", "--save_steps", 2]
    with caplog.at_level(logging.INFO):
        assert cli(*argv) == 0
    summary = caplog.records[-1].getMessage().splitlines()
    assert summary[0].startswith("done in ") and "trainer zo" in summary[0]
    assert re.fullmatch(r"  accuracy \d\.?\d*", summary[1])
    assert summary[2] == "  result:     result/SST2-tiny-opt-sampleeval4-ntrain8-trainset0.json"
    assert summary[3] == f"  output:     {out} (checkpoints: checkpoint-2; log: trainer_state.json)"
    assert summary[4] == "  adapter:    result/SST2-tiny-opt-sampleeval4-ntrain8-trainset0-adapter"


def test_the_argument_dump_shows_what_differs_from_the_defaults(cli, caplog, tiny_opt_dir):
    with caplog.at_level(logging.INFO):
        assert cli("--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 2) == 0
    dump = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("arguments"))
    lines = dump.splitlines()[1:]
    assert lines == [
        f"  data_dir = {os.environ[tasks.DATA_DIR_ENV]!r}",  # from $LOZO_DATA_DIR, always shown
        f"  model_name = {str(tiny_opt_dir)!r}",
        "  num_eval = 2",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli("--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 2, "--verbose") == 0
    dump = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("arguments"))
    assert "  zo_eps = 0.001" in dump and "  learning_rate = 5e-05" in dump and len(dump.splitlines()) > 100


def test_help_lists_the_projects_options_first_each_with_help_and_values():
    parser = run_lozo.build_parser()
    text = parser.format_help()
    assert text.index("--task_name") < text.index("--trainer") < text.index("--output_dir")
    assert "SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, SQuAD, DROP" in " ".join(text.split())
    assert "none, regular, zo, LOZO" in " ".join(text.split())
    ours = set(OUR_OPTIONS)
    helped = {action.dest: action.help for action in parser._actions if action.dest in ours}
    assert set(helped) == ours and all(helped.values()), [k for k, v in helped.items() if not v]


OUR_OPTIONS = [
    name
    for name in run_lozo.OurArguments.__dataclass_fields__
    if name not in run_lozo.TrainingArguments.__dataclass_fields__
]


def test_a_mistyped_local_model_folder_fails_at_once_with_a_suggestion(cli, capsys, tmp_path):
    (tmp_path / "models" / "SmolLM2-135M").mkdir(parents=True)
    assert cli("--task_name", "SST2", "--model_name", "models/SmolLM2-135m", "--num_eval", 2) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            "error: model folder models/SmolLM2-135m does not exist (did you mean models/SmolLM2-135M?)"
        )
    )


def test_evaluating_saved_adapters_names_the_result_by_adapter():
    args = run_lozo.parse_args(
        ["--task_name", "SST2", "--model_name", "facebook/opt-125m", "--train_set_seed", "0"]
    )
    args.load_adapter = "result/run-a-adapter/"
    assert run_lozo.result_file_tag(args) == "SST2-opt-125m-adapter-run-a-adapter"


def test_summarize_lists_a_folders_results_and_files(cli, tmp_path, tiny_opt_dir):
    out = tmp_path / "runs"
    argv = ["--task_name", "SST2", "--model_name", tiny_opt_dir, "--num_eval", 2, "--load_bfloat16"]
    assert cli(*argv, "--result_file", out / "zero-shot.json") == 0
    (out / "old.json").write_text('{"accuracy": 0.5}')  # written before results carried their run
    (out / "trainer_state.json").write_text('{"log_history": []}')
    lines = utils.summarize(out).splitlines()
    assert lines[0] == f"{out / 'old.json'}: accuracy 0.5"
    assert re.fullmatch(
        rf"{out / 'zero-shot.json'}: accuracy [0-9.]+  \(SST2, trainer none, bfloat16, \d+ s\)", lines[1]
    )
    assert lines[2:] == [
        "files:",
        *(f"  {out / name}" for name in ("old.json", "trainer_state.json", "zero-shot.json")),
    ]
