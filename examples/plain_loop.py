"""LOZO (or MeZO) as a plain PyTorch optimizer, in a loop of your own: two forward passes a step, no
Trainer, no gradients.

    python examples/plain_loop.py --model models/SmolLM2-135M --output_dir result/example-loop

`ZOOptimizer(..., low_rank=False)` is MeZO; `momentum=0.9` with `low_rank=True` is LOZO-M.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from zo_optimizer import ZOOptimizer  # noqa: E402

TEXTS = ["The film is a quiet triumph of craft and feeling.", "A tedious, overlong mess with nothing to say."]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a hub name or a local folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id or 0
    model = AutoModelForCausalLM.from_pretrained(opts.model).eval()  # eval: both losses see one function
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    eps = 1e-3
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = ZOOptimizer(trained, lr=1e-5, eps=eps, seed=0, low_rank=True, rank=2, step_interval=10)
    optimizer.attach(model)  # LOZO's side path: the model computes with the low-rank perturbation
    with torch.no_grad():
        for step in range(opts.steps):
            optimizer.begin_step()  # this step's directions
            optimizer.move_to(+1)
            loss_plus = model(**batch, labels=labels).loss
            optimizer.move_to(-1)
            loss_minus = model(**batch, labels=labels).loss
            optimizer.set_projected_grad((loss_plus - loss_minus).item() / (2 * eps))
            optimizer.step()  # the update; the model is back at θ
            print(f"step {step}: loss {(loss_plus + loss_minus).item() / 2:.4f}")
    optimizer.release()  # the updates are written into the weights, the model is left alone
    model.save_pretrained(opts.output_dir)
    tokenizer.save_pretrained(opts.output_dir)


if __name__ == "__main__":
    main()
