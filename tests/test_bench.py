"""The benchmark runs end to end and reports every field the README's table reads (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_zo_step_benchmark_reports_each_method(tiny_opt_dir, data_dir, tmp_path):
    out = tmp_path / "bench.json"
    methods = "forward,LOZO-r4,MeZO,MeZO-chunk20,LOZO-released,FT-AdamW"
    command = [
        sys.executable,
        str(REPO / "bench" / "zo_step.py"),
        "--model",
        str(tiny_opt_dir),
        "--batch",
        "2",
    ]
    command += ["--seq", "8", "--steps", "1", "--warmup", "0", "--threads", "1", "--methods", methods]
    command += ["--profile"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["methods"]) == methods.split(",")
    for key in (
        "model",
        "device",
        "dtype",
        "batch",
        "seq",
        "forward_s",
        "inference_peak_mem_mb",
        "torch_threads",
    ):
        assert key in report
    for name, method in report["methods"].items():
        assert method["step_s"] > 0 and method["peak_mem_mb"] > 0, name
        assert method["ratio_to_two_forwards"] == method["step_s"] / (2 * method["forward_s"])
    assert report["methods"]["forward"]["mem_ratio_to_inference"] == 1.0
    assert report["forward_s"] == report["methods"]["forward"]["step_s"]
    # The project's own ZO steps also report the cost of their weight passes alone (the profile of a step).
    with_passes = {name for name, method in report["methods"].items() if "weight_passes_s" in method}
    assert with_passes == {"LOZO-r4", "MeZO", "MeZO-chunk20"}
    assert all(0 < report["methods"][name]["weight_passes_s"] for name in with_passes)
    assert all(0 < report["methods"][name]["weight_passes_ops"] for name in with_passes)
    # MeZO's default step is also timed against its in-place step, alternated in one process.
    mezo = report["methods"]["MeZO"]
    assert mezo["over_in_place"] == mezo["alternated"]["default_s"] / mezo["alternated"]["in_place_s"]
    assert "MeZO, alternated in one process with its in-place step" in done.stdout
    draws = mezo["profile"]["aten::normal_"]  # --profile: one step's top operations (MeZO: its draws)
    assert draws["calls"] > 0 and draws["self_s"] > 0
    assert "MeZO, one step profiled: aten::normal_" in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| LOZO-r4 |" in done.stdout


def test_unknown_shape_is_a_one_line_error(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "zo_step.py"), "--model", "shape:opt-7b"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: unknown shape shape:opt-7b; use one of: shape:opt-125m, shape:opt-350m, shape:opt-1.3b, "
        "shape:opt-6.7b"
    ]


def test_replay_benchmark_replays_each_method_bit_for_bit(tiny_opt_dir, tmp_path):
    out = tmp_path / "replay.json"
    command = [sys.executable, str(REPO / "bench" / "replay.py"), "--model", str(tiny_opt_dir)]
    command += ["--steps", "120", "--mezo-steps", "3", "--out", str(out)]  # past two V redraws
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["LOZO", "LOZO-M", "MeZO"]
    for name, method in report["methods"].items():
        assert method["bit_identical"] and method["replay_s"] > 0 and method["record_bytes"] > 0, name
    assert report["methods"]["LOZO"]["steps"] == 120 and report["methods"]["MeZO"]["steps"] == 3


def test_evaluation_batch_benchmark_compares_the_two_ways_on_real_samples(tiny_opt_dir, data_dir, tmp_path):
    """In float32 the batched scores are the one-at-a-time ones up to the order of sums: no prediction
    differs. SST-2's options are one token (one row a sample), Copa's several (a row a candidate)."""
    out = tmp_path / "eval_batch.json"
    command = [sys.executable, str(REPO / "bench" / "eval_batch.py"), "--model", str(tiny_opt_dir)]
    command += ["--dtype", "float32", "--tasks", "SST2", "Copa", "--samples", "6", "--batch", "4"]
    command += ["--threads", "1", "--data_dir", str(data_dir), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["batch"] == 4 and report["float32_products"] is False
    for task in ("SST2", "Copa"):
        found = report[task]
        assert found["samples"] == 6 and found["predictions_differing"] == []
        assert found["largest_score_difference"] < 1e-4
        assert found["seconds_per_sample_one_at_a_time"] > 0 and found["seconds_per_sample_batched"] > 0
