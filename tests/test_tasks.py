"""tasks.py against the real shared data: loading, sample fields, seeded selection, and usage errors."""

import gzip
import json
from functools import cache
from pathlib import Path

import datasets
import numpy as np
import pytest

import tasks
from utils import UsageError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (train rows, valid rows) of the shared copies, from shared/data/SOURCES.md.
ROW_COUNTS = {
    "SST2": (67349, 872),
    "RTE": (2490, 277),
    "CB": (250, 56),
    "BoolQ": (67, 3270),
    "WSC": (554, 104),
    "WIC": (5428, 638),
    "MultiRC": (27243, 4848),
    "Copa": (400, 100),
    "ReCoRD": (73, 2),
    "SQuAD": (11877, 10570),
    "DROP": (281, 73),
}
CLASS_LABELS = {"SST2": 2, "RTE": 2, "CB": 3, "WSC": 2, "WIC": 2, "MultiRC": 2}


@cache
def load(task_name):
    """Each task is loaded once per test run."""
    return tasks.get_task(task_name, data_dir=DATA_DIR)


def raw_rows(folder, split):
    """The split's rows read straight from the jsonl file, independently of tasks.py."""
    path = DATA_DIR / folder / f"{split}.jsonl"
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


# --- loading -------------------------------------------------------------------------------------


def test_task_names_are_mezo_names():
    assert list(tasks.TASKS) == list(ROW_COUNTS)


@pytest.mark.parametrize("task_name", list(ROW_COUNTS))
def test_every_task_loads_with_source_row_counts(task_name):
    task = load(task_name)
    assert (len(task.samples["train"]), len(task.samples["valid"])) == ROW_COUNTS[task_name]
    assert task.valid_samples is task.samples["valid"]
    assert task.get_task_name() == task_name
    assert task.train_sep == "\n\n"
    assert task.generation == (task_name in ("SQuAD", "DROP"))
    assert task.metric_name == ("f1" if task.generation else "accuracy")


@pytest.mark.parametrize("task_name", list(ROW_COUNTS))
def test_samples_follow_file_order(task_name):
    task = load(task_name)
    valid_raw = raw_rows(task.folder, "validation")
    for position in (0, len(valid_raw) // 2, len(valid_raw) - 1):
        sample = task.valid_samples[position]
        for field in task.required_fields:
            if (task_name, field) == ("SQuAD", "answers"):
                continue  # replaced by the flat gold list, checked in its own test
            assert sample.data[field] == valid_raw[position][field]


@pytest.mark.parametrize("task_name", list(CLASS_LABELS))
def test_classification_samples_use_label_ids(task_name):
    task = load(task_name)
    candidates = list(range(CLASS_LABELS[task_name]))
    for split, folder_split in (("train", "train"), ("valid", "validation")):
        labels = [row["label"] for row in raw_rows(task.folder, folder_split)]
        samples = task.samples[split]
        assert [sample.correct_candidate for sample in samples] == labels
        assert all(sample.candidates == candidates for sample in samples)


def test_sst2_ids_are_idx_and_other_classification_ids_are_none():
    sst2 = load("SST2")
    assert [s.id for s in sst2.valid_samples[:3]] == [0, 1, 2]
    assert sst2.valid_samples[0].data["sentence"] == "it 's a charming and often affecting journey . "
    assert sst2.valid_samples[0].correct_candidate == 1
    for task_name in ("RTE", "CB", "WSC", "WIC", "MultiRC", "BoolQ", "ReCoRD"):
        assert load(task_name).valid_samples[0].id is None


def test_boolq_correct_is_yes_or_no_from_the_boolean_answer():
    boolq = load("BoolQ")
    raw = raw_rows("boolq", "validation")
    assert [s.correct_candidate for s in boolq.valid_samples] == ["Yes" if r["answer"] else "No" for r in raw]
    assert boolq.valid_samples[0].correct_candidate == "No"  # "does ethanol take more energy ..." is false
    assert boolq.samples["train"][0].correct_candidate == "Yes"
    assert all(s.candidates == ["Yes", "No"] for s in boolq.valid_samples)
    assert (
        "title" not in boolq.valid_samples[0].data
        and " -- " not in boolq.valid_samples[0].data["passage"][:60]
    )


def test_copa_candidates_are_choice_texts():
    copa = load("Copa")
    first = copa.valid_samples[0]
    assert first.id == 0
    assert first.candidates == ["The toilet filled with water.", "Water flowed from the spout."]
    assert first.correct_candidate == "Water flowed from the spout."  # label 1 -> choice2
    for sample, row in zip(copa.samples["train"], raw_rows("copa", "train"), strict=True):
        assert sample.id == row["idx"]
        assert sample.candidates == [row["choice1"], row["choice2"]]
        assert sample.correct_candidate == row[f"choice{row['label'] + 1}"]


def test_record_candidates_are_entities_in_order_and_correct_is_all_answers():
    record = load("ReCoRD")
    first = record.valid_samples[0]
    assert first.correct_candidate == ["Morgan", "Tracy Morgan"]
    assert first.candidates[:3] == ["Amy Schumer", "James", "Jimmy Mack"]
    for sample, row in zip(record.samples["train"], raw_rows("record", "train"), strict=True):
        assert sample.candidates == row["entities"]
        assert sample.correct_candidate == row["answers"]
        assert all(answer in sample.candidates for answer in sample.correct_candidate)


def test_squad_keeps_duplicate_answers_and_numbers_rows():
    squad = load("SQuAD")
    first = squad.valid_samples[0]
    assert first.id == 0 and squad.valid_samples[19].id == 19
    assert first.correct_candidate == ["Denver Broncos", "Denver Broncos", "Denver Broncos"]
    assert first.data["answers"] == first.correct_candidate
    assert first.data["title"] == "Super_Bowl_50"
    assert first.candidates is None
    raw = raw_rows("squad", "validation")
    assert [s.correct_candidate for s in squad.valid_samples] == [r["answers"]["text"] for r in raw]


def test_drop_multi_span_answers_are_alternative_golds():
    drop = load("DROP")
    first = drop.valid_samples[0]
    assert first.id == 0 and first.candidates is None
    assert first.correct_candidate == ["Chaz Schilens", "JaMarcus Russell"]
    assert first.data["passage"].startswith(" Hoping")  # untouched, leading space kept
    assert drop.samples["train"][29].correct_candidate == ["Marshawn Lynch", "Benjamin Watson"]
    assert drop.samples["train"][0].correct_candidate == ["3"]


def test_multirc_is_one_sample_per_answer_row():
    multirc = load("MultiRC")
    first = multirc.valid_samples[0]
    assert first.data["answer"] == "No" and first.correct_candidate == 0
    assert first.data["question"].startswith("Would the mass of a baseball")


def test_default_templates():
    assert type(load("BoolQ").get_template()).__name__ == "BoolQTemplateV3"
    assert type(load("BoolQ").get_template(0)).__name__ == "BoolQTemplate"
    assert type(load("ReCoRD").get_template()).__name__ == "ReCoRDTemplateGPT3"
    assert type(load("SQuAD").get_template()).__name__ == "SQuADv2Template"
    with pytest.raises(UsageError, match="template version 5"):
        load("RTE").get_template(5)


# --- sampling (spec section 8) -------------------------------------------------------------------


def test_per_sample_demo_seeds_match_mezo():
    assert tasks.per_sample_demo_seeds(5) == [2732, 9845, 3264, 4859, 9225]
    assert tasks.per_sample_demo_seeds(1000)[:5] == [2732, 9845, 3264, 4859, 9225]


def test_subset_is_in_permutation_order_and_deterministic():
    rte = load("RTE")
    picked = rte.sample_subset("train", seed=7, num=20)
    order = np.random.RandomState(7).permutation(len(rte.samples["train"]))[:20]
    assert picked == [rte.samples["train"][i] for i in order]
    assert picked == rte.sample_subset("train", seed=7, num=20)
    assert list(order) != sorted(order)
    assert rte.sample_subset("train", seed=8, num=20) != picked


def test_subset_larger_than_split_returns_every_row_once():
    cb = load("CB")
    picked = cb.sample_subset("train", seed=0, num=1000)
    assert len(picked) == 250
    assert len({id(sample) for sample in picked}) == 250


def test_subset_exclude_follows_mezo():
    cb = load("CB")
    order = np.random.RandomState(3).permutation(250).tolist()
    with_excluded = cb.sample_subset("train", seed=3, num=5, exclude=order[2])
    assert with_excluded == [cb.samples["train"][i] for i in order[:6] if i != order[2]]
    far_away = order[100]
    assert cb.sample_subset("train", seed=3, num=5, exclude=far_away) == cb.sample_subset("train", 3, 5)


def test_sampling_leaves_the_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    load("CB").sample_subset("train", seed=5, num=10)
    load("CB").sample_train_sets(num_train=4, num_eval=3)
    assert np.array_equal(np.random.rand(3), expected)


def test_train_set_with_seed_includes_dev_at_the_end():
    rte = load("RTE")
    (train_set,) = rte.sample_train_sets(num_train=10, num_dev=5, seed=0)
    assert train_set == rte.sample_subset("train", seed=0, num=15)
    train, dev = tasks.split_train_dev(train_set, 5)
    assert (train, dev) == (train_set[:10], train_set[10:])


def test_small_split_shrinks_the_train_part_first():
    wsc = load("WSC")
    (train_set,) = wsc.sample_train_sets(num_train=1000, num_dev=500, seed=0)
    train, dev = tasks.split_train_dev(train_set, 500)
    assert (len(train), len(dev)) == (54, 500)
    train, dev = tasks.split_train_dev(load("CB").sample_train_sets(100, 300, seed=0)[0], 300)
    assert (len(train), len(dev)) == (0, 250)


def test_numbered_train_sets_use_seeds_0_to_n():
    cb = load("CB")
    sets = cb.sample_train_sets(num_train=8, num_train_sets=3)
    assert sets == [cb.sample_subset("train", seed=k, num=8) for k in range(3)]


def test_in_context_default_gives_one_demo_set_per_eval_sample():
    cb = load("CB")
    sets = cb.sample_train_sets(num_train=4, num_eval=5)
    assert sets == [cb.sample_subset("train", seed=s, num=4) for s in (2732, 9845, 3264, 4859, 9225)]
    assert len(cb.sample_train_sets(num_train=2)) == len(cb.valid_samples)
    with pytest.raises(UsageError, match="num_dev"):
        cb.sample_train_sets(num_train=2, num_dev=2)


def test_eval_samples_are_a_seeded_subset_or_all_rows():
    copa = load("Copa")
    assert copa.sample_eval_samples() is copa.valid_samples
    assert copa.sample_eval_samples(num_eval=10, seed=0) == copa.sample_subset("valid", 0, 10)


# --- task names, data folders and errors ---------------------------------------------------------


def test_unknown_task_lists_valid_names():
    with pytest.raises(UsageError) as error:
        tasks.get_task("sst2", data_dir=DATA_DIR)
    message = str(error.value)
    assert "'sst2'" in message and "did you mean 'SST2'" in message
    assert "SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, SQuAD, DROP" in message


def write_rows(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


RTE_ROW = '{"premise": "A man sleeps.", "hypothesis": "A man rests.", "idx": %d, "label": %d}'


def rte_folder(root, train_lines=None, valid_lines=None):
    write_rows(root / "rte" / "train.jsonl", train_lines or [RTE_ROW % (0, 0), RTE_ROW % (1, 1)])
    write_rows(root / "rte" / "validation.jsonl", valid_lines or [RTE_ROW % (0, 1)])
    return root


def test_group_subtask_names_and_env_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(rte_folder(tmp_path)))
    task = tasks.get_task("RTE__mysub")
    assert task.get_task_name() == "mysub"
    assert [s.correct_candidate for s in task.samples["train"]] == [0, 1]


def test_gzipped_split_files_load(tmp_path):
    write_rows(tmp_path / "rte" / "train.jsonl.gz", [RTE_ROW % (0, 1)])
    write_rows(tmp_path / "rte" / "validation.jsonl", [RTE_ROW % (0, 0)])
    assert tasks.get_task("RTE", data_dir=tmp_path).samples["train"][0].correct_candidate == 1


def test_missing_data_folder(tmp_path):
    with pytest.raises(UsageError, match=f"data folder {tmp_path / 'cb'} not found.*LOZO_DATA_DIR"):
        tasks.get_task("CB", data_dir=tmp_path)


def test_missing_split_file_names_the_path(tmp_path):
    write_rows(tmp_path / "rte" / "train.jsonl", [RTE_ROW % (0, 0)])
    with pytest.raises(UsageError, match=f"missing data file {tmp_path / 'rte' / 'validation.jsonl'}"):
        tasks.get_task("RTE", data_dir=tmp_path)


def assert_points_at(error_info, path, line, *words):
    message = str(error_info.value)
    assert "\n" not in message
    assert f"{path} line {line}:" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_corrupt_line_names_file_and_line(tmp_path, suffix):
    bad = tmp_path / "rte" / f"train{suffix}"
    write_rows(bad, [RTE_ROW % (0, 0), "", RTE_ROW % (1, 1), '{"premise": "cut off', RTE_ROW % (3, 1)])
    write_rows(tmp_path / "rte" / "validation.jsonl", [RTE_ROW % (0, 1)])
    with pytest.raises(UsageError) as error:
        tasks.get_task("RTE", data_dir=tmp_path)
    assert_points_at(error, bad, 4, "not valid JSON")


def test_line_without_a_required_field_names_file_line_and_field(tmp_path):
    no_hypothesis = '{"premise": "A man sleeps.", "idx": 2, "label": 0}'
    rte_folder(tmp_path, train_lines=[RTE_ROW % (0, 0), "", RTE_ROW % (1, 1), no_hypothesis])
    with pytest.raises(UsageError) as error:
        tasks.get_task("RTE", data_dir=tmp_path)
    assert_points_at(error, tmp_path / "rte" / "train.jsonl", 4, "'hypothesis'")


def test_field_missing_from_every_row_points_at_the_first_line(tmp_path):
    rte_folder(tmp_path, valid_lines=['{"premise": "p", "hypothesis": "h", "idx": 0}'])
    with pytest.raises(UsageError) as error:
        tasks.get_task("RTE", data_dir=tmp_path)
    assert_points_at(error, tmp_path / "rte" / "validation.jsonl", 1, "'label'")


def test_out_of_range_label_names_file_and_line(tmp_path):
    rte_folder(tmp_path, train_lines=[RTE_ROW % (0, 0), RTE_ROW % (1, 2)])
    with pytest.raises(UsageError) as error:
        tasks.get_task("RTE", data_dir=tmp_path)
    assert_points_at(error, tmp_path / "rte" / "train.jsonl", 2, "label 2")


def test_squad_row_without_answers_is_an_error(tmp_path):
    row = {
        "id": "x",
        "title": "T",
        "context": "c",
        "question": "q?",
        "answers": {"text": ["a"], "answer_start": [0]},
    }
    empty = {**row, "answers": {"text": [], "answer_start": []}}
    write_rows(tmp_path / "squad" / "train.jsonl", [json.dumps(row)])
    write_rows(tmp_path / "squad" / "validation.jsonl", [json.dumps(row), json.dumps(empty)])
    with pytest.raises(UsageError) as error:
        tasks.get_task("SQuAD", data_dir=tmp_path)
    assert_points_at(error, tmp_path / "squad" / "validation.jsonl", 2, "answers.text is empty")


HUB_IDS = {
    "SST2": ("nyu-mll/glue", "sst2"),
    "RTE": ("aps/super_glue", "rte"),
    "CB": ("aps/super_glue", "cb"),
    "BoolQ": ("google/boolq", None),
    "WSC": ("aps/super_glue", "wsc.fixed"),
    "WIC": ("aps/super_glue", "wic"),
    "MultiRC": ("aps/super_glue", "multirc"),
    "Copa": ("aps/super_glue", "copa"),
    "ReCoRD": ("aps/super_glue", "record"),
    "SQuAD": ("rajpurkar/squad", None),
    "DROP": ("ucinlp/drop", None),
}


@pytest.fixture
def online(monkeypatch):
    """As if the hub answered (there is no network here): only datasets.load_dataset is simulated."""
    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(tasks, "hub_unreachable", lambda: None)


def test_without_a_data_dir_tasks_load_from_the_hub(online, monkeypatch):
    requested = []

    def failing_hub(path, name=None, **kwargs):
        requested.append((path, name))
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", failing_hub)
    for task_name in HUB_IDS:
        with pytest.raises(UsageError, match="could not load hub dataset .*connection reset.*LOZO_DATA_DIR"):
            tasks.get_task(task_name)
    assert requested == list(HUB_IDS.values())


def test_a_hub_repository_with_a_loading_script_is_read_from_its_parquet_conversion(online, monkeypatch):
    """datasets 4+ refuses loading scripts (SuperGLUE still has one): the main revision fails as it does
    in datasets 5, the automatic Parquet conversion then gives the rows."""
    rows = [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 1}]
    hub = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split in ("train", "validation")})
    requested = []

    def hub_with_a_script(path, name=None, revision=None, **kwargs):
        requested.append(revision)
        if revision != "refs/convert/parquet":
            raise RuntimeError("Dataset scripts are no longer supported, but found super_glue.py")
        return hub

    monkeypatch.setattr(datasets, "load_dataset", hub_with_a_script)
    assert tasks.get_task("RTE").valid_samples[0].correct_candidate == 1
    assert requested == [None, "refs/convert/parquet"]


def test_offline_without_a_data_folder_fails_at_once_naming_it(monkeypatch):
    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub must not be asked"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UsageError,
        match=r"no local data for SST2 and the Hugging Face hub is offline \(HF_HUB_OFFLINE\); set LOZO_DATA",
    ):
        tasks.get_task("SST2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)

    def no_route(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tasks.socket, "create_connection", no_route)
    with pytest.raises(UsageError, match=r"hub is unreachable \(\[Errno -3\] Temporary failure"):
        tasks.get_task("SST2")


def test_hub_rows_become_samples(online, monkeypatch):
    rows = [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 1}]
    hub = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split in ("train", "validation")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kwargs: hub)
    assert tasks.get_task("RTE").valid_samples[0].correct_candidate == 1
