"""The 11 MeZO tasks: load each split into `Sample`s and draw train / demo / eval subsets.

Spec: shared/spec/TASKS.md, section 1 (what each row becomes) and section 8 (seeded selection).
Data comes from local jsonl copies when a data folder is given (argument or $LOZO_DATA_DIR),
otherwise from the Hugging Face hub, exactly as MeZO loads it.
"""

import contextlib
import gzip
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

import templates
from utils import UsageError, temp_seed

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "LOZO_DATA_DIR"
# Hub repositories of MeZO's datasets under their current names. GLUE, BoolQ, SQuAD and DROP are plain
# data files; SuperGLUE still ships a loading script, which datasets 4+ refuses, so it is read from the
# hub's automatic Parquet conversion instead (same rows and features).
GLUE, SUPER_GLUE = "nyu-mll/glue", "aps/super_glue"
PARQUET_REVISION = "refs/convert/parquet"
SPLIT_FILES = {"train": "train", "valid": "validation"}  # our split name -> file / hub split name


@dataclass
class Sample:
    id: Any = None
    data: dict | None = None
    correct_candidate: Any = None
    candidates: list | None = None


class RowProblem(ValueError):
    """A data row cannot become a sample; the loader adds which file and line it came from."""


# ----------------------------------------------------------------------------------------------
# Reading local jsonl files
# ----------------------------------------------------------------------------------------------


def _split_file(folder, file_stem):
    for name in (f"{file_stem}.jsonl", f"{file_stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise UsageError(
        f"missing data file {folder / (file_stem + '.jsonl')} (or .jsonl.gz); "
        f"put the {file_stem} split there or point {DATA_DIR_ENV} at a complete data folder"
    )


def _open_lines(path):
    """Binary line iterator; json.loads accepts UTF-8 bytes, so decoding errors also surface per line."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _first_bad_line(path, required_fields):
    """(line number, problem) of the first line that is not a JSON object with the fields; else None."""
    number = 0
    try:
        with _open_lines(path) as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue  # the json loader skips blank lines too
                try:
                    row = json.loads(raw)
                except ValueError as error:
                    return number, f"not valid JSON ({error})"
                if not isinstance(row, dict):
                    return number, "not a JSON object"
                missing = [field for field in required_fields if row.get(field) is None]
                if missing:
                    return number, f"missing field {missing[0]!r}"
    except (OSError, EOFError) as error:  # a damaged .gz stream
        return number + 1, f"unreadable ({error})"
    return None


def _line_of_row(path, position):
    """1-based line number of the row at `position` (blank lines hold no row)."""
    rows_seen = 0
    with _open_lines(path) as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                if rows_seen == position:
                    return number
                rows_seen += 1
    return position + 1


def _row_location(source, position):
    if isinstance(source, Path):
        return f"{source} line {_line_of_row(source, position)}"
    return f"{source} row {position}"


@contextlib.contextmanager
def _quiet_datasets():
    """Silence progress bars and the loader's own error log (we raise a clearer error) for one load."""
    bars_were_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def load_hub_dataset(path, config):
    """datasets.load_dataset, falling back to the hub's Parquet conversion of a repository that still ships
    a loading script (datasets 4+ no longer runs them)."""
    try:
        return datasets.load_dataset(path, config)
    except RuntimeError as error:
        if "scripts are no longer supported" not in str(error):
            raise
        return datasets.load_dataset(path, config, revision=PARQUET_REVISION)


def hub_unreachable(host="huggingface.co", timeout=3.0):
    """Why the hub cannot be reached ("offline (HF_HUB_OFFLINE)", "unreachable (...)"), or None — asked
    once, quickly, instead of letting the hub client retry for a minute."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            return f"offline ({variable})"
    if any(os.environ.get(variable) for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # through a proxy: let the hub client find out
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"unreachable ({_one_line(error)})"
    return None


def _one_line(text):
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def checked_label(example, candidates):
    label = example["label"]
    if isinstance(label, bool) or label not in candidates:
        raise RowProblem(f"label {label!r} is not one of {candidates}")
    return label


class Dataset:
    """One task: `samples["train"]` and `samples["valid"]`, each a list of Samples in file order."""

    task_name = None
    folder = None  # folder name under the data directory
    hub_path = None  # datasets.load_dataset(hub_path, hub_config) when no data directory is set
    hub_config = None
    required_fields = ()  # top-level row fields build_sample reads; checked with file and line on load
    template_classes = {}  # template_version -> template class
    default_template_version = 0

    train_sep = "\n\n"  # between demonstrations, and between demonstrations and the evaluated sample
    generation = False  # SQuAD / DROP: the model generates the answer instead of scoring candidates
    metric_name = "accuracy"

    def __init__(self, subtask=None, data_dir=None):
        self.subtask = subtask
        self.samples = self.load_samples(resolve_data_dir(data_dir))

    def get_task_name(self):
        return self.subtask if self.subtask is not None else self.task_name

    def get_template(self, template_version=None):
        if template_version is None:
            template_version = self.default_template_version
        if template_version not in self.template_classes:
            raise UsageError(
                f"{self.task_name} has no template version {template_version!r}; "
                f"use one of {sorted(self.template_classes)}"
            )
        return self.template_classes[template_version]()

    @property
    def valid_samples(self):
        return self.samples["valid"]

    def build_sample(self, example, position):
        """Turn one row (a dict) at 0-based `position` of its split into a Sample."""
        raise NotImplementedError

    # --- loading ---------------------------------------------------------------------------

    def load_samples(self, data_dir):
        splits = self.read_local_splits(data_dir) if data_dir else self.read_hub_splits()
        return {split: self.build_samples(dataset, source) for split, (dataset, source) in splits.items()}

    def read_local_splits(self, data_dir):
        folder = Path(data_dir) / self.folder
        if not folder.is_dir():
            raise UsageError(
                f"data folder {folder} not found for task {self.task_name}; "
                f"point {DATA_DIR_ENV} (or data_dir) at the folder that holds {self.folder}/, "
                "or unset it to load from the Hugging Face hub"
            )
        paths = {split: _split_file(folder, stem) for split, stem in SPLIT_FILES.items()}
        files = {SPLIT_FILES[split]: str(path) for split, path in paths.items()}
        try:
            with _quiet_datasets():
                loaded = datasets.load_dataset("json", data_files=files)
        except Exception as error:
            raise self.explain_load_failure(paths.values(), error) from error
        return {split: (loaded[SPLIT_FILES[split]], path) for split, path in paths.items()}

    def explain_load_failure(self, paths, error):
        # Only on failure do we read the files a second time, to point at the offending line.
        for path in paths:
            bad = _first_bad_line(path, self.required_fields)
            if bad is not None:
                number, problem = bad
                return UsageError(
                    f"{path} line {number}: {_one_line(problem)}; fix or delete that line, "
                    "or re-create the data file"
                )
        names = ", ".join(str(path) for path in paths)
        return UsageError(f"could not read {names} ({_one_line(error)}); check that they are jsonl files")

    def read_hub_splits(self):
        name = "/".join(part for part in (self.hub_path, self.hub_config) if part)
        offline = hub_unreachable()
        if offline:
            raise UsageError(
                f"no local data for {self.task_name} and the Hugging Face hub is {offline}; set "
                f"{DATA_DIR_ENV} or --data_dir to a folder with <task>/{{train,validation}}.jsonl "
                "(the offline copies: ../shared/data)"
            )
        try:
            with _quiet_datasets():
                loaded = load_hub_dataset(self.hub_path, self.hub_config)
        except Exception as error:
            raise UsageError(
                f"could not load hub dataset {name} ({_one_line(error)}); "
                f"check the network, or set {DATA_DIR_ENV} to a folder with local copies"
            ) from error
        return {
            split: (loaded[hub_split], f"hub dataset {name} {hub_split}")
            for split, hub_split in SPLIT_FILES.items()
        }

    def build_samples(self, dataset, source):
        try:
            rows = dataset.to_list()  # column-wise Arrow conversion: much faster than indexing row by row
        except ValueError as error:  # e.g. invalid UTF-8, which the Arrow JSON reader lets through
            if isinstance(source, Path):
                raise self.explain_load_failure([source], error) from error
            raise
        self.check_required_fields(dataset.column_names, rows, source)
        samples = []
        for position, row in enumerate(rows):
            try:
                samples.append(self.build_sample(row, position))
            except RowProblem as problem:
                raise UsageError(
                    f"{_row_location(source, position)}: {_one_line(problem)}; "
                    "fix or delete that row, or re-create the data file"
                ) from None
        return samples

    def check_required_fields(self, column_names, rows, source):
        for field in self.required_fields:
            if field in column_names:
                position = next((i for i, row in enumerate(rows) if row[field] is None), None)
            else:
                position = 0 if rows else None
            if position is not None:
                raise UsageError(
                    f"{_row_location(source, position)}: missing field {field!r} needed by {self.task_name}; "
                    "add it or re-create the data file"
                )

    # --- sampling (spec section 8) ---------------------------------------------------------

    def sample_subset(self, data_split="train", seed=0, num=100, exclude=None):
        """The first `num` samples of a seeded permutation of the split, in permutation order.

        With `exclude` (an index), MeZO takes num + 1 and drops `exclude` if it is among them.
        """
        if data_split not in self.samples:
            raise UsageError(f"unknown data split {data_split!r}; use one of {sorted(self.samples)}")
        samples = self.samples[data_split]
        with temp_seed(seed):
            order = np.random.permutation(len(samples)).tolist()
        if exclude is None:
            picked = order[:num]
        else:
            picked = order[: num + 1]
            if exclude in picked:
                picked.remove(exclude)
            else:
                picked = picked[:num]
        return [samples[i] for i in picked]

    def sample_train_sets(self, num_train=32, num_dev=None, num_eval=None, num_train_sets=None, seed=None):
        """Train (or demonstration) sets; when num_dev is given, each set ends with its dev samples."""
        if seed is not None:
            seeds = [seed]
        elif num_train_sets is not None:
            seeds = list(range(num_train_sets))
        else:
            if num_dev is not None:
                raise UsageError("num_dev needs one fixed train set: also pass seed (or num_train_sets)")
            seeds = per_sample_demo_seeds(len(self.valid_samples) if num_eval is None else num_eval)
        set_size = num_train if num_dev is None else num_train + num_dev
        if num_dev is not None and set_size > len(self.samples["train"]):
            rows = len(self.samples["train"])
            logger.warning(
                "%s: num_train + num_dev = %d exceeds the %d training rows; using %d to train, %d for dev",
                self.task_name,
                set_size,
                rows,
                max(rows - num_dev, 0),
                min(num_dev, rows),
            )
        return [self.sample_subset("train", set_seed, set_size) for set_seed in seeds]

    def sample_eval_samples(self, num_eval=None, seed=0):
        """Evaluation samples: a seeded subset of the valid split, or all of it in order."""
        return self.valid_samples if num_eval is None else self.sample_subset("valid", seed, num_eval)


def per_sample_demo_seeds(count):
    """MeZO's in-context default: one demo-set seed per evaluated sample, drawn under seed 0."""
    with temp_seed(0):
        return np.random.randint(0, 10000, count).tolist()


def split_train_dev(train_set, num_dev=None):
    """(train, dev): dev is the last `num_dev` samples of a set from sample_train_sets, as MeZO slices it."""
    if num_dev is None:
        return list(train_set), []
    if num_dev <= 0:
        raise UsageError(f"num_dev must be a positive count, got {num_dev}; leave it unset for no dev set")
    return list(train_set[:-num_dev]), list(train_set[-num_dev:])


class LabelDataset(Dataset):
    """Classification rows: candidates are the class ids, the correct one is the row's label."""

    num_labels = 2
    id_field = None  # only SST2 carries its row id into the sample

    def build_sample(self, example, position):
        candidates = list(range(self.num_labels))
        return Sample(
            id=example[self.id_field] if self.id_field else None,
            data=example,
            correct_candidate=checked_label(example, candidates),
            candidates=candidates,
        )


class SST2Dataset(LabelDataset):
    task_name, folder, hub_path, hub_config = "SST2", "sst2", GLUE, "sst2"
    required_fields = ("sentence", "label", "idx")
    template_classes = {0: templates.SST2Template}
    id_field = "idx"


class RTEDataset(LabelDataset):
    task_name, folder, hub_path, hub_config = "RTE", "rte", SUPER_GLUE, "rte"
    required_fields = ("premise", "hypothesis", "label")
    template_classes = {0: templates.RTETemplate}


class CBDataset(LabelDataset):
    task_name, folder, hub_path, hub_config = "CB", "cb", SUPER_GLUE, "cb"
    required_fields = ("premise", "hypothesis", "label")
    template_classes = {0: templates.CBTemplate}
    num_labels = 3


class WSCDataset(LabelDataset):
    task_name, folder, hub_path, hub_config = "WSC", "wsc", SUPER_GLUE, "wsc.fixed"
    required_fields = ("text", "span1_text", "span2_text", "label")
    template_classes = {0: templates.WSCTemplate}


class WICDataset(LabelDataset):
    task_name, folder, hub_path, hub_config = "WIC", "wic", SUPER_GLUE, "wic"
    required_fields = ("word", "sentence1", "sentence2", "label")
    template_classes = {0: templates.WICTemplate}


class MultiRCDataset(LabelDataset):
    # One sample per (paragraph, question, answer option) row: no grouping, plain accuracy.
    task_name, folder, hub_path, hub_config = "MultiRC", "multirc", SUPER_GLUE, "multirc"
    required_fields = ("paragraph", "question", "answer", "label")
    template_classes = {0: templates.MultiRCTemplate}


class BoolQDataset(Dataset):
    # google/boolq (passage without title, boolean answer), not super_glue/boolq.
    task_name, folder, hub_path, hub_config = "BoolQ", "boolq", "google/boolq", None
    required_fields = ("question", "passage", "answer")
    # MeZO's numbering: version 2 (its third variant) is the default.
    template_classes = {
        0: templates.BoolQTemplate,
        1: templates.BoolQTemplateV2,
        2: templates.BoolQTemplateV3,
    }
    default_template_version = 2

    def build_sample(self, example, position):
        answer = example["answer"]
        if not isinstance(answer, bool):
            raise RowProblem(f"answer {answer!r} is not true/false")
        return Sample(data=example, correct_candidate="Yes" if answer else "No", candidates=["Yes", "No"])


class CopaDataset(Dataset):
    task_name, folder, hub_path, hub_config = "Copa", "copa", SUPER_GLUE, "copa"
    required_fields = ("premise", "choice1", "choice2", "question", "label", "idx")
    template_classes = {0: templates.CopaTemplate}

    def build_sample(self, example, position):
        candidates = [example["choice1"], example["choice2"]]
        label = checked_label(example, [0, 1])
        return Sample(
            id=example["idx"], data=example, correct_candidate=candidates[label], candidates=candidates
        )


class ReCoRDDataset(Dataset):
    # Candidates keep the dataset's entity order (it decides ties and the training target index).
    task_name, folder, hub_path, hub_config = "ReCoRD", "record", SUPER_GLUE, "record"
    required_fields = ("passage", "query", "entities", "answers")
    template_classes = {0: templates.ReCoRDTemplateGPT3}

    def build_sample(self, example, position):
        return Sample(data=example, correct_candidate=example["answers"], candidates=example["entities"])


class GenerationDataset(Dataset):
    """Free-text answer tasks: id = row position, no candidates, correct = the list of gold strings."""

    generation = True
    metric_name = "f1"
    answers_field = None  # (row field, sub-field) holding the gold strings

    def build_sample(self, example, position):
        field, subfield = self.answers_field
        container = example[field]
        answers = container.get(subfield) if isinstance(container, dict) else None
        if not answers:
            raise RowProblem(f"{field}.{subfield} is empty; every {self.task_name} row needs a gold answer")
        # Templates read the flat gold list as data["answers"]; duplicates are kept on purpose.
        data = {**example, "answers": answers}
        return Sample(id=position, data=data, correct_candidate=answers, candidates=None)


class SQuADDataset(GenerationDataset):
    task_name, folder, hub_path, hub_config = "SQuAD", "squad", "rajpurkar/squad", None
    required_fields = ("title", "context", "question", "answers")
    template_classes = {0: templates.SQuADv2Template}
    answers_field = ("answers", "text")


class DROPDataset(GenerationDataset):
    task_name, folder, hub_path, hub_config = "DROP", "drop", "ucinlp/drop", None
    required_fields = ("passage", "question", "answers_spans")
    template_classes = {0: templates.DROPTemplate}
    answers_field = ("answers_spans", "spans")


TASKS = {
    cls.task_name: cls
    for cls in (
        SST2Dataset,
        RTEDataset,
        CBDataset,
        BoolQDataset,
        WSCDataset,
        WICDataset,
        MultiRCDataset,
        CopaDataset,
        ReCoRDDataset,
        SQuADDataset,
        DROPDataset,
    )
}


def resolve_data_dir(data_dir=None):
    """The explicit folder, else $LOZO_DATA_DIR, else None (load from the hub)."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def get_task(task_name, data_dir=None):
    """Load a task by MeZO name ("SST2", ...; "Group__subtask" passes the subtask on)."""
    group, _, subtask = task_name.partition("__")
    if group not in TASKS:
        hint = next((f" (did you mean {name!r}?)" for name in TASKS if name.lower() == group.lower()), "")
        raise UsageError(f"unknown task {task_name!r}{hint}; valid task names: {', '.join(TASKS)}")
    return TASKS[group](subtask=subtask or None, data_dir=data_dir)
