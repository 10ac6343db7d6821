"""LOZO in your own training script with the Hugging Face Trainer: any causal LM, standard
`TrainingArguments`, the zeroth-order settings in `ZOArguments`, your own data.

    python examples/trainer_lozo.py --model models/SmolLM2-135M --output_dir result/example-trainer

`ZOArguments(trainer="LOZO", lozo_optimizer="sgdm")` is LOZO-M and `ZOArguments(trainer="zo")` MeZO. Without
labels the loss is the language-model loss on every real token after the first; batches from run_lozo's
task pipeline (option_len, candidates) give MeZO's option losses instead.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from LOZOtrainer import LowRankTrainer, ZOArguments  # noqa: E402

TEXTS = [
    "The film is a quiet triumph of craft and feeling.",
    "A tedious, overlong mess with nothing to say.",
    "Sharp writing and two terrific performances.",
    "I wanted to leave after twenty minutes.",
] * 4


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
    model = AutoModelForCausalLM.from_pretrained(opts.model)
    data = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = LowRankTrainer(
        model=model,
        args=args,
        zo_args=ZOArguments(trainer="LOZO", zo_eps=1e-3, rank_r=2, step_interval=10),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()  # the effective weights: the low-rank factors are merged first


if __name__ == "__main__":
    main()
