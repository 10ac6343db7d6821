"""Training curves of several runs against forward passes: smoothed training loss and dev accuracy.

    python bench/plot_training.py result/lozo-smollm2 result/mezo-smollm2 --out result/curves.png

Each argument is a run's --output_dir holding trainer_state.json (run_lozo.py writes it after training);
a label can be given as LABEL=DIR. A zeroth-order step costs two forward passes of the batch.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORWARDS_PER_STEP = 2  # L(θ+εZ) and L(θ-εZ)


def smooth(values, weight=0.8):
    """Exponential moving average, as TensorBoard draws it."""
    out, running = [], None
    for v in values:
        running = v if running is None else weight * running + (1 - weight) * v
        out.append(running)
    return out


def load_history(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    history = state["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [
        (e["step"], v) for e in history for k, v in e.items() if k.startswith("eval_") and k != "eval_loss"
    ]
    return losses, evals


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="DIR or LABEL=DIR")
    parser.add_argument("--out", default="result/training_curves.png")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        label, _, folder = run.rpartition("=")
        losses, evals = load_history(folder)
        label = label or Path(folder).name
        steps, values = zip(*losses, strict=True)
        loss_axis.plot([s * FORWARDS_PER_STEP for s in steps], smooth(values), label=label)
        if evals:
            steps, values = zip(*evals, strict=True)
            eval_axis.plot([s * FORWARDS_PER_STEP for s in steps], values, marker="o", label=label)
    loss_axis.set(xlabel="forward passes", ylabel="training loss (EMA 0.8)", title="training loss")
    eval_axis.set(xlabel="forward passes", ylabel="dev accuracy", title="dev accuracy")
    for axis in (loss_axis, eval_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if args.title:
        figure.suptitle(args.title)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
