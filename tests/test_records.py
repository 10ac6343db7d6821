"""Committed records travel: no file under docs/ holds an absolute path of the machine that wrote it (the
checkout, a home or a temporary folder), and a new result records paths relative to the working folder."""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    str(REPO),
    str(REPO.parent),
    os.path.expanduser("~"),
    tempfile.gettempdir(),
    "/home",
    "/root",
    "/tmp",
}
ABSOLUTE = re.compile(
    r"""(?:^|["'\s=(:,\[])(""" + "|".join(re.escape(r) for r in ROOTS if r != "/") + r")(?=/|\b)"
)


def test_no_committed_record_holds_an_absolute_path_of_this_machine():
    listed = subprocess.run(["git", "ls-files", "docs"], cwd=REPO, capture_output=True, text=True).stdout
    # (a study run that finishes removes its committed unfinished checkpoint before the next commit)
    files = [REPO / name for name in listed.split() if (REPO / name).is_file()]
    assert files
    offending = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # figures
        if ABSOLUTE.search(text):
            offending.append(f"{path.relative_to(REPO)}: {ABSOLUTE.search(text).group(1)}")
    assert not offending, offending[:5]


def test_a_result_records_its_paths_relative_to_the_working_folder(
    tiny_opt_dir, data_dir, tmp_path, monkeypatch
):
    import run_lozo

    monkeypatch.chdir(tmp_path)
    argv = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "4", "--num_dev", "2", "--num_eval", "2", "--train_set_seed", "0", "--trainer", "zo",
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "out"),
        "--result_file", "r.json", "--report_to", "none",
    ]  # fmt: skip
    assert run_lozo.main(argv) == 0
    text = (tmp_path / "r.json").read_text()
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text).group(0)
    run = json.loads(text)["run"]
    assert run["device"] and Path(run["model"]) == Path(os.path.relpath(tiny_opt_dir))


def test_help_opens_with_a_usage_paragraph_and_the_ten_common_options():
    import run_lozo

    text = run_lozo.build_parser().format_help()
    assert "python run_lozo.py --task_name SST2" in text.split("options:")[0]
    listed = re.findall(r"^  --(\w+)", text.split("options:")[1], flags=re.M)
    assert listed[:10] == list(run_lozo.COMMON_OPTIONS)
