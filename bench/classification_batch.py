"""What one-row classification batches and padding-free packing save: a training batch of real samples
scored with every candidate as its own row (the layout before), with one row per sample
(`DataCollatorWithPaddingAndNesting` when every option is one token), and with those rows packed side by
side into fewer rows (`pack_batch`, run_lozo's default --padding_free), on the same model.

    python bench/classification_batch.py --model models/SmolLM2-135M --dtype bfloat16 --threads 1

Per task: the training loss of one batch (the forward a ZO step runs twice, inference mode), timed in
alternation between the layouts (so a shared machine's load slows all alike), the median of --reps each;
and how far the layouts' losses are apart in this dtype (the same function: only the rounding of
differently shaped products differs). Writes result/bench/classification_batch-<dtype>.json.
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
    pack_batch,
    portable,
    target_mask,
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
def loss(model, batch, pad_token_id, pack):
    return float(model_option_loss(model, batch, pad_token_id, pack=pack))


def packed_shape(batch, pad_token_id):
    """(rows, row width) `pack_batch` makes of a batch (its own when nothing packs)."""
    mask = target_mask(batch["input_ids"], batch["attention_mask"], batch.get("option_len"), pad_token_id)
    packed = pack_batch(batch["input_ids"], batch["attention_mask"], torch.nn.functional.pad(mask, (0, 1)))
    return (packed[0]["input_ids"] if packed else batch["input_ids"]).shape


def measure(model, tokenizer, task_name, opts):
    collate = DataCollatorWithPaddingAndNesting(tokenizer.pad_token_id)
    groups = training_groups(task_name, tokenizer, opts.batch, opts.data_dir)
    per_sample = collate(groups)
    if "candidate_ids" not in per_sample:
        return {"task": task_name, "one_token_options": False}
    layouts = {  # name: (batch, packed)
        "one row per candidate": (collate([c for g in groups for c in g]), False),
        "one row per sample": (per_sample, False),
        "one row per sample, packed": (per_sample, True),
    }
    times, losses = {name: [] for name in layouts}, {}
    for _ in range(opts.reps + 1):  # the first round warms up
        for name, (batch, pack) in layouts.items():
            began = time.perf_counter()
            losses[name] = loss(model, batch, tokenizer.pad_token_id, pack)
            times[name].append(time.perf_counter() - began)
    seconds = [statistics.median(t[1:]) for t in times.values()]
    shapes = [tuple(batch["input_ids"].shape) for batch, _ in layouts.values()]
    shapes[2] = tuple(packed_shape(per_sample, tokenizer.pad_token_id))
    return {
        "task": task_name,
        "one_token_options": True,
        "layouts": list(layouts),
        "rows": [rows for rows, _ in shapes],
        "row_width": [width for _, width in shapes],
        "tokens": int(per_sample["attention_mask"].sum()),
        "forward_s": seconds,
        "speedup_one_row": seconds[0] / seconds[1],
        "speedup_packed": seconds[1] / seconds[2],
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
        "model": portable(opts.model),
        "dtype": opts.dtype,
        "batch": opts.batch,
        "threads": torch.get_num_threads(),
    }
    report["tasks"] = [measure(model, tokenizer, name, opts) for name in opts.tasks.split(",")]
    out = REPO / "result" / "bench" / f"classification_batch-{opts.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        "| task | rows (per candidate / per sample / packed) | row width | real tokens | loss forward (s) "
        "| one row per sample | packed | loss | losses apart by |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["tasks"]:
        if not r["one_token_options"]:
            print(f"| {r['task']} | options of several tokens: one row per candidate | | | | | | | |")
            continue
        rows, width, seconds = (
            "/".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r[k])
            for k in ("rows", "row_width", "forward_s")
        )
        apart = max(r["losses"]) - min(r["losses"])
        print(
            f"| {r['task']} | {rows} | {width} | {r['tokens']} | {seconds} | {r['speedup_one_row']:.2f}× | "
            f"{r['speedup_packed']:.2f}× | {r['losses'][2]:.4f} | {apart:.1e} |"
        )
    print(out)


if __name__ == "__main__":
    main()
