"""What one-row classification batches save: a training batch of real samples scored with every candidate
as its own row (the layout before) against one row per sample (`DataCollatorWithPaddingAndNesting` when
every option is one token), on the same model.

    python bench/classification_batch.py --model models/SmolLM2-135M --dtype bfloat16 --threads 1

Per task: the training loss of one batch (the forward a ZO step runs twice, inference mode), timed in
alternation between the two layouts (so a shared machine's load slows both alike), the median of --reps
each; and how far the two layouts' losses are apart in this dtype (the same function: only the rounding
of differently shaped products differs). Writes result/bench/classification_batch-<dtype>.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tasks  # noqa: E402
from run_lozo import correct_index, load_tokenizer  # noqa: E402
from utils import (  # noqa: E402
    DataCollatorWithPaddingAndNesting,
    classification_features,
    encode_prompt,
    model_option_loss,
)


def training_groups(task_name, tokenizer, batch, data_dir):
    """The first `batch` training samples, each the list of its candidates (run_lozo's training features)."""
    task = tasks.get_task(task_name, data_dir)
    groups = []
    for sample in task.samples["train"][:batch]:
        encodings, option_lens = encode_prompt(
            task, task.get_template(), [], sample, tokenizer, 2048, generation_with_gold=True
        )
        groups.append(classification_features(encodings, option_lens, correct_index(sample, first_only=True)))
    return groups


@torch.inference_mode()
def loss(model, batch, pad_token_id):
    return float(model_option_loss(model, batch, pad_token_id))


def measure(model, tokenizer, task_name, opts):
    collate = DataCollatorWithPaddingAndNesting(tokenizer.pad_token_id)
    groups = training_groups(task_name, tokenizer, opts.batch, opts.data_dir)
    layouts = {
        "one row per candidate": collate([c for g in groups for c in g]),
        "one row per sample": collate(groups),
    }
    if "candidate_ids" not in layouts["one row per sample"]:
        return {"task": task_name, "one_token_options": False}
    times, losses = {name: [] for name in layouts}, {}
    for _ in range(opts.reps + 1):  # the first round warms up
        for name, batch in layouts.items():
            began = time.perf_counter()
            losses[name] = loss(model, batch, tokenizer.pad_token_id)
            times[name].append(time.perf_counter() - began)
    per_candidate, per_sample = (statistics.median(t[1:]) for t in times.values())
    return {
        "task": task_name,
        "one_token_options": True,
        "rows": [layout["input_ids"].shape[0] for layout in layouts.values()],
        "tokens": [int(layout["attention_mask"].sum()) for layout in layouts.values()],
        "padded_length": [layout["input_ids"].shape[1] for layout in layouts.values()],
        "forward_s": [per_candidate, per_sample],
        "speedup": per_candidate / per_sample,
        "losses": list(losses.values()),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tasks", default="SST2,RTE,WIC,BoolQ,CB")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=getattr(torch, opts.dtype)).eval()
    # run_lozo's tokenizer: its pad id (0 for Llama-family models) and, for OPT, MeZO's BOS.
    tokenizer = load_tokenizer(argparse.Namespace(model_path=None, model_name=opts.model), model.config)
    report = {
        "model": opts.model,
        "dtype": opts.dtype,
        "batch": opts.batch,
        "threads": torch.get_num_threads(),
    }
    report["tasks"] = [measure(model, tokenizer, name, opts) for name in opts.tasks.split(",")]
    out = REPO / "result" / "bench" / f"classification_batch-{opts.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("| task | rows | tokens | padded length | loss forward (s) | speed-up | loss | loss apart by |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["tasks"]:
        if not r["one_token_options"]:
            print(f"| {r['task']} | options of several tokens: one row per candidate | | | | | | |")
            continue
        rows, tokens, length, seconds = (
            "/".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r[k])
            for k in ("rows", "tokens", "padded_length", "forward_s")
        )
        apart = abs(r["losses"][0] - r["losses"][1])
        print(
            f"| {r['task']} | {rows} | {tokens} | {length} | {seconds} | {r['speedup']:.2f}× | "
            f"{r['losses'][1]:.4f} | {apart:.1e} |"
        )
    print(out)


if __name__ == "__main__":
    main()
