"""One command for zero-shot, in-context learning and fine-tuning (first-order, MeZO, LOZO, LOZO-M).

    python run_lozo.py --task_name SST2 --model_name facebook/opt-13b --num_train 32 --num_eval 1000
    python run_lozo.py --task_name SST2 --trainer LOZO --num_train 1000 --num_dev 500 --train_set_seed 0 ...

Every `transformers.TrainingArguments` option is accepted too. Metrics land in
result/<task>-<model>-<tags>.json.
"""

import argparse
import copy
import dataclasses
import difflib
import enum
import functools
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import align_special_tokens

import tasks
from LOZOtrainer import LowRankTrainer, checkpoint_problem, last_complete_checkpoint
from metrics import calculate_metric
from tuning_modes import (
    HeadInputs,
    apply_tuning_mode,
    fit_linear_probe,
    save_adapter,
    untie_embeddings,
    write_head_rows,
)
from utils import (
    DataCollatorWithPaddingAndNesting,
    NondiffCollator,
    Prediction,
    UsageError,
    accepts_logits_to_keep,
    classification_features,
    device_name,
    encode_prompt,
    needs_float32_products,
    option_scores,
    portable,
    products_for,
    read_result,
    target_log_probs,
    target_logits,
    target_mask,
    tokenizer_adds_bos,
    write_metrics_to_file,
)

logger = logging.getLogger("run_lozo")

TRAINERS = ("none", "regular", "zo", "LOZO")
LOZO_OPTIMIZERS = ("sgd", "sgdm")


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class OurArguments(TrainingArguments):
    """The project's own options (listed first by --help); every `transformers.TrainingArguments` option
    follows."""

    # task and sampling
    task_name: str = option("SST2", f"the task, one of: {', '.join(tasks.TASKS)}")
    data_dir: str | None = option(
        None,
        f"folder with <task>/{{train,validation}}.jsonl[.gz]; default ${tasks.DATA_DIR_ENV}, else the HF hub",
    )
    num_train: int = option(0, "training samples (in-context learning: demonstrations; 0: zero-shot)")
    num_dev: int | None = option(None, "dev samples taken from the train set, for evaluation during training")
    num_eval: int | None = option(None, "evaluation samples (default: the whole validation split)")
    num_test: int | None = option(None, "alias of --num_eval (LOZO's name)")
    num_train_sets: int | None = option(None, "several train sets, seeds 0..N-1, one result each")
    train_set_seed: int | None = option(None, "one train set with this seed (it also picks the eval subset)")
    result_file: str | None = option(
        None,
        "where the result JSON goes (default: result/<task>-<model>-...json); it will not replace another "
        "run's result",
    )

    # model
    model_name: str = option("facebook/opt-125m", "a hub name or a local folder with config.json")
    model_path: str | None = option(None, "load from this folder, but name results by --model_name")
    load_float16: bool = option(False, "float16 weights (MeZO's default on GPUs)")
    load_bfloat16: bool = option(False, "bfloat16 weights: half the memory of float32, as fast or faster")
    load_int8: bool = option(False, "int8 weights through bitsandbytes (CUDA only; inference)")
    max_length: int = option(2048, "longest prompt in tokens; longer ones lose their first demonstrations")
    no_auto_device: bool = option(False, "do not spread the model over several GPUs (device_map='auto')")
    untie_emb: bool = option(False, "give the LM head its own copy of the input embeddings")

    # calibration
    sfc: bool = option(False, "surface-form competition calibration (MeZO's --sfc)")
    icl_sfc: bool = option(False, "calibration with the demonstrations in the calibration prompt")

    # training
    trainer: str = option("none", f"one of: {', '.join(TRAINERS)} (none: zero-shot / ICL; zo: MeZO)")
    only_train_option: bool = option(True, "loss on the option tokens only (False: the whole sequence)")
    train_as_classification: bool = option(False, "cross-entropy over the candidates' scores")
    padding_free: bool = option(
        True,
        "run a training batch's sequences side by side in as few rows as fit its longest one, each seeing "
        "only itself (sdpa attention), instead of padding every one to it: the same loss, less padding",
    )

    # zeroth-order (MeZO / LOZO)
    zo_eps: float = option(1e-3, "perturbation scale ε")
    rank_r: int = option(2, "LOZO: rank r of the direction U·Vᵀ")
    step_interval: int = option(50, "LOZO: ν, V is redrawn every ν steps")
    lozo_optimizer: str = option("sgd", f"LOZO: one of {', '.join(LOZO_OPTIMIZERS)} (sgdm: LOZO-M)")
    beta1: float = option(0.9, "LOZO-M: momentum β")
    merge_periods: int = option(
        8,
        "LOZO: a matrix's updates stay as low-rank factors beside its weights for this many V periods, "
        "then are written into them at once (stochastically rounded in half precision)",
    )
    zo_in_place: bool = option(
        False,
        "MeZO: perturb and update the weights in place as MeZO's code does (every perturbation rounds and "
        "half-precision weights drift); by default each module computes with its perturbed weights built "
        "for its own forward, and the weights change only by the update",
    )
    zo_master_weights: bool = option(
        False,
        "MeZO: keep a float32 master copy of the weights (+4 bytes a weight) that takes the update exactly; "
        "by default half-precision weights take it with stochastic rounding (inference memory)",
    )
    zo_compensated: bool = option(
        False,
        "MeZO: half-precision weights take the update rounded to nearest, the rounding error kept in a "
        "compensation buffer of their dtype (Kahan summation, +2 bytes a weight) and added to the next one; "
        "by default they round stochastically (inference memory)",
    )
    zo_batched_pair: bool = option(
        False,
        "zeroth-order: evaluate θ+εZ and θ−εZ of every direction (--zo_queries q) in one forward pass of "
        "the batch 2q times instead of 2q passes (the same g; faster where one forward of 2qB rows costs "
        "less than 2q of B; 2q times the activations: where that does not fit, halve "
        "--per_device_train_batch_size and double --gradient_accumulation_steps, which takes the same step)",
    )
    zo_queries: int = option(
        1, "zeroth-order: directions a step, each with its own ±ε pair; the update averages their g·Z"
    )
    non_diff: bool = option(
        False, "zeroth-order only: train on minus the F1 of generated answers (SQuAD, DROP)"
    )

    # generation
    sampling: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature")
    num_beams: int = option(1, "beam search width")
    top_k: int | None = option(None, "sampling: top-k")
    top_p: float = option(0.95, "sampling: nucleus probability")
    max_new_tokens: int = option(50, "longest generated answer")
    eos_token: str = option("\n", "generation stops at this text")

    # saving and misc
    save_model: bool = option(False, "save the trained model into --output_dir")
    no_eval: bool = option(False, "train only: no final evaluation and no result file")
    tag: str = option("", "added to the result's name")
    verbose: bool = option(False, "log every argument and each prediction")
    save_on_interrupt: bool = option(
        False, "on SIGTERM or SIGUSR1, checkpoint after the current step and exit 0 (no result)"
    )
    zo_trajectory_checkpoints: bool = option(
        False,
        "zeroth-order: a checkpoint records each step's projected gradient and learning rate (kilobytes) "
        "instead of the weights; resuming retakes those steps from the starting model (no forward passes)",
    )

    # parameter-efficient modes (MeZO's names and defaults)
    lora: bool = option(False, "LoRA on the attention query/value projections (peft); base frozen")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA scaling α")
    prefix_tuning: bool = option(False, "trainable key/value prefixes in every attention layer (peft)")
    num_prefix: int = option(5, "prefix tuning: number of prefix tokens")
    no_reparam: bool = option(True, "prefix tuning: train the prefixes directly (no MLP reparameterisation)")
    prefix_init_by_real_act: bool = option(True, "prefix tuning: start from the keys/values of real tokens")
    head_tuning: bool = option(False, "train the LM head only (the tied embeddings unless --untie_emb)")
    linear_probing: bool = option(False, "logistic regression on the final hidden states, into the LM head")
    lp_early_stopping: bool = option(False, "linear probing: looser tolerance, fewer iterations")
    load_adapter: str | None = option(None, "a saved LoRA / prefix adapter folder to evaluate or train on")

    # Defaults that differ from HF's: keep the custom batch keys; no checkpoints unless asked
    remove_unused_columns: bool = False
    save_strategy: str = "no"

    def __post_init__(self):
        if self.num_test is not None:
            self.num_eval = self.num_test if self.num_eval is None else self.num_eval
        self.data_dir = tasks.resolve_data_dir(self.data_dir)  # the folder actually used, as logged
        if self.data_dir is not None:
            self.data_dir = os.path.abspath(self.data_dir)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to a GPU
        validate_arguments(self)
        warn_ignored_settings(self)
        if (world_size() > 1 or self.bf16) and not torch.cuda.is_available():
            # Else accelerate ignores torchrun's processes on a CPU-only machine (each would train alone),
            # and TrainingArguments refuses bf16 autocast on the CPU unless told it is the CPU.
            self.use_cpu = True
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = task_metric(self)
            self.greater_is_better = True
        super().__post_init__()


GENERATION_TASKS = ("SQuAD", "DROP")


def world_size():
    """Processes started together by torchrun (1 for a plain `python run_lozo.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def task_metric(args):
    """The metric evaluation reports (and model selection can use) for the task."""
    return "f1" if args.task_name.split("__")[0] in GENERATION_TASKS else "accuracy"


def missing_local_model(path):
    """Why `path`, which looks like a local folder, cannot be loaded; None when it is a folder or looks like
    a hub name (owner/name: one slash, no leading dot, tilde or slash, not inside an existing folder)."""
    if path is None or os.path.isdir(path):
        return None
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(path.split("/")[0])
    if not looks_local:
        return None
    parent = os.path.dirname(os.path.expanduser(path).rstrip("/")) or "."
    siblings = os.listdir(parent) if os.path.isdir(parent) else []
    near = difflib.get_close_matches(os.path.basename(path.rstrip("/")), siblings, n=1)
    hint = f" (did you mean {os.path.join(os.path.dirname(path.rstrip('/')), near[0])}?)" if near else ""
    return f"model folder {path} does not exist{hint}"


def validate_arguments(args):
    """Reject bad settings up front with one line naming the fix (nothing is loaded or written yet)."""
    checks = [
        (
            missing_local_model(args.model_path or args.model_name) is None,
            f"{missing_local_model(args.model_path or args.model_name)}; give an existing folder with "
            "config.json or a hub name (offline model: python utils.py prepare-model smollm2)",
        ),
        (args.trainer in TRAINERS, f"unknown --trainer {args.trainer!r}; use one of: {', '.join(TRAINERS)}"),
        (args.rank_r >= 1, f"--rank_r must be >= 1, got {args.rank_r}"),
        (args.step_interval >= 1, f"--step_interval must be >= 1, got {args.step_interval}"),
        (args.zo_eps > 0, f"--zo_eps must be > 0, got {args.zo_eps}"),
        (0 <= args.beta1 < 1, f"--beta1 must be in [0, 1), got {args.beta1}"),
        (args.merge_periods >= 1, f"--merge_periods must be >= 1, got {args.merge_periods}"),
        (
            not (args.zo_master_weights and (args.trainer != "zo" or args.zo_in_place)),
            "--zo_master_weights is a MeZO option (--trainer zo) and excludes --zo_in_place; LOZO always "
            "keeps float32 masters of its vectors",
        ),
        (
            not (args.zo_in_place and args.trainer != "zo"),
            "--zo_in_place is MeZO's arithmetic (--trainer zo); LOZO never writes perturbations into its "
            "matrices",
        ),
        (args.zo_queries >= 1, f"--zo_queries must be >= 1, got {args.zo_queries}"),
        (
            not (
                args.zo_compensated and (args.trainer != "zo" or args.zo_master_weights or args.zo_in_place)
            ),
            "--zo_compensated is for MeZO's default arithmetic (--trainer zo, without --zo_master_weights "
            "or --zo_in_place)",
        ),
        (
            not ((args.zo_batched_pair or args.zo_queries > 1) and args.trainer not in ("zo", "LOZO")),
            "--zo_batched_pair and --zo_queries are zeroth-order options: add --trainer zo or --trainer LOZO",
        ),
        (
            not ((args.zo_batched_pair or args.zo_queries > 1) and args.zo_in_place),
            "--zo_in_place holds one perturbation in the weights at a time: drop it to use "
            "--zo_batched_pair or --zo_queries",
        ),
        (
            args.lozo_optimizer in LOZO_OPTIMIZERS,
            f"unknown --lozo_optimizer {args.lozo_optimizer!r}; use one of: {', '.join(LOZO_OPTIMIZERS)}",
        ),
        (
            not (args.non_diff and args.task_name.split("__")[0] not in GENERATION_TASKS),
            f"--non_diff needs a generation task ({', '.join(GENERATION_TASKS)}), not {args.task_name}",
        ),
        (
            not (args.non_diff and args.trainer not in ("zo", "LOZO")),
            "--non_diff needs a zeroth-order trainer: add --trainer zo or --trainer LOZO",
        ),
        (
            not (args.train_as_classification and args.task_name.split("__")[0] in GENERATION_TASKS),
            f"--train_as_classification does not apply to the generation task {args.task_name}; drop it",
        ),
        (args.num_train >= 0, f"--num_train must be >= 0, got {args.num_train}"),
        (
            (args.trainer == "none" and not args.linear_probing)
            or args.train_set_seed is not None
            or args.num_train_sets is not None,
            "training needs one train set: pass --train_set_seed (or --num_train_sets)",
        ),
        (
            args.trainer != "none" or args.linear_probing or args.num_dev is None,
            "--num_dev is for training; drop it with --trainer none",
        ),
        (args.max_length > 1, f"--max_length must be > 1, got {args.max_length}"),
        *mode_checks(args),
        (not (args.load_float16 and args.load_bfloat16), "choose one of --load_float16 and --load_bfloat16"),
        (
            not ((args.fp16 or args.bf16) and args.trainer in ("zo", "LOZO")),
            "--fp16/--bf16 mixed precision needs gradients; load half-precision weights with --load_float16 "
            "or --load_bfloat16 for zeroth-order training",
        ),
        (
            not (args.zo_trajectory_checkpoints and args.trainer not in ("zo", "LOZO")),
            "--zo_trajectory_checkpoints records zeroth-order steps: add --trainer zo or --trainer LOZO, "
            "or drop it",
        ),
        (
            not (
                args.zo_trajectory_checkpoints and args.zo_in_place and args.gradient_accumulation_steps > 1
            ),
            "--zo_trajectory_checkpoints with --zo_in_place replays one perturbation per step, but "
            "--gradient_accumulation_steps makes one per micro-batch (each rounds in place): drop one",
        ),
        (
            not (args.zo_trajectory_checkpoints and (args.load_best_model_at_end or args.save_only_model)),
            "--zo_trajectory_checkpoints saves steps, not weights: drop --load_best_model_at_end / "
            "--save_only_model, or drop it",
        ),
        (
            not (args.fsdp and args.trainer in ("zo", "LOZO")),
            "--fsdp shards gradients and optimizer state, which zeroth-order training has none of; drop it "
            "(under torchrun ZO runs data-parallel with one full replica per process)",
        ),
        (
            not (args.torch_compile and args.trainer == "LOZO"),
            "--torch_compile cannot trace LOZO's side path (forward hooks and a TorchFunctionMode); drop "
            "--torch_compile (MeZO, --trainer zo, compiles)",
        ),
        (
            not ((args.num_train_sets or 0) > 1 and args.trainer != "none"),
            "--num_train_sets N with a trainer would train each set on top of the model the last one left; "
            "train one set per run with --train_set_seed k",
        ),
        (
            not (args.fsdp and not torch.cuda.is_available()),
            "--fsdp needs GPUs: accelerate runs FSDP on accelerators only (on CPU it would silently use DDP)",
        ),
        (
            args.metric_for_best_model in (None, task_metric(args), f"eval_{task_metric(args)}"),
            f"--metric_for_best_model {args.metric_for_best_model!r} is not reported for {args.task_name}; "
            f"use {task_metric(args)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def warn_ignored_settings(args):
    """LOZO's own settings mean nothing to the other trainers: say so rather than ignore them silently."""
    lozo_only = {"rank_r": 2, "step_interval": 50, "lozo_optimizer": "sgd", "beta1": 0.9, "merge_periods": 8}
    changed = [f"--{name}" for name, default in lozo_only.items() if getattr(args, name) != default]
    if changed and args.trainer != "LOZO":
        logger.warning(
            "%s only apply to --trainer LOZO; ignored with --trainer %s", ", ".join(changed), args.trainer
        )


def mode_checks(args):
    """(ok, message) for the parameter-efficient modes: one mode at a time, sane sizes."""
    names = ("lora", "prefix_tuning", "head_tuning", "linear_probing")
    modes = [f"--{name}" for name in names if getattr(args, name)]
    task = args.task_name.split("__")[0]
    return [
        (len(modes) <= 1, f"choose one of {' and '.join(modes)}"),
        (not (args.load_adapter and modes), f"--load_adapter brings its own adapter; drop {' '.join(modes)}"),
        (
            not args.load_adapter or os.path.isfile(os.path.join(args.load_adapter, "adapter_config.json")),
            f"--load_adapter {args.load_adapter}: no adapter_config.json there; give a folder saved with "
            "--lora or --prefix_tuning",
        ),
        (args.lora_r >= 1, f"--lora_r must be >= 1, got {args.lora_r}"),
        (args.lora_alpha > 0, f"--lora_alpha must be > 0, got {args.lora_alpha}"),
        (args.num_prefix >= 1, f"--num_prefix must be >= 1, got {args.num_prefix}"),
        (
            args.no_reparam or not (args.prefix_tuning and args.prefix_init_by_real_act),
            "--prefix_init_by_real_act sets the prefixes themselves; add --no_reparam "
            "(or --prefix_init_by_real_act False)",
        ),
        (
            not (args.linear_probing and args.train_as_classification),
            "--linear_probing fits the LM head in closed form; drop --train_as_classification",
        ),
        (
            not (args.linear_probing and args.trainer != "none"),
            f"--linear_probing fits the LM head in closed form; drop --trainer {args.trainer}",
        ),
        (
            not (args.linear_probing and task in ("Copa", "ReCoRD", *GENERATION_TASKS)),
            f"--linear_probing needs fixed label words; {args.task_name} has per-sample answers",
        ),
        (
            not (args.linear_probing and (args.sfc or args.icl_sfc)),
            "--linear_probing scores with the fitted head alone; drop --sfc/--icl_sfc",
        ),
        (
            args.trainer != "none" or args.linear_probing or not modes,
            f"{' '.join(modes)} trains parameters: add --trainer (regular, zo or LOZO), or evaluate a saved "
            "adapter with --load_adapter",
        ),
        (
            not (args.fsdp and (modes or args.load_adapter)),
            "--fsdp shards full-parameter training; drop it with the parameter-efficient modes",
        ),
    ]


def result_file_tag(args):
    """MeZO's result naming: <task>-<model>[-sfc][-icl_sfc][-sampleevalN][-ntrainN][-ndevN][-tag], and
    -adapter-<folder> when evaluating or training a saved adapter."""
    parts = [args.task_name, args.model_name.rstrip("/").split("/")[-1]]
    parts += ["sfc"] if args.sfc else []
    parts += ["icl_sfc"] if args.icl_sfc else []
    parts += [f"sampleeval{args.num_eval}"] if args.num_eval is not None else []
    parts += [f"ntrain{args.num_train}"] if args.num_train > 0 else []
    parts += [f"ndev{args.num_dev}"] if args.num_dev is not None else []
    parts += [args.tag] if args.tag else []
    # Evaluating two saved adapters must not write one result file.
    parts += [f"adapter-{os.path.basename(args.load_adapter.rstrip('/'))}"] if args.load_adapter else []
    return "-".join(parts)


def result_paths(args):
    """The result files this run writes: one per train set (--result_file with several gets -trainset<i>
    before its extension), or one for in-context learning with a demonstration set per evaluation sample."""
    if args.train_set_seed is None and args.num_train_sets is None:
        return [args.result_file or f"result/{result_file_tag(args)}-onetrainpereval.json"]
    count = 1 if args.train_set_seed is not None else args.num_train_sets
    if args.result_file and count == 1:
        return [args.result_file]
    if args.result_file:
        stem, extension = os.path.splitext(args.result_file)
        return [f"{stem}-trainset{set_id}{extension}" for set_id in range(count)]
    return [f"result/{result_file_tag(args)}-trainset{set_id}.json" for set_id in range(count)]


# Settings that change where a run writes, what it logs, and how it checkpoints or evaluates on the way, but
# not what it computes: two runs that differ only in these may share a result file.
BOOKKEEPING = re.compile(
    r"(output_dir|result_file|tag|data_dir|run_name|project|report_to|verbose|disable_tqdm|debug|"
    r"logging_.*|log_.*|save_.*|hub_.*|trackio_.*|push_to_hub|resume_from_checkpoint|"
    r"restore_callback_states_from_checkpoint|ignore_data_skip|dataloader_.*|ddp_.*|local_rank|"
    r"eval_strategy|eval_steps|eval_delay|eval_on_start|per_device_eval_batch_size|eval_accumulation_steps|"
    r"skip_memory_metrics|torch_empty_cache_steps|zo_trajectory_checkpoints|no_auto_device)"
)


def result_conflict(args, path):
    """Why writing `path` would lose another run's result (None when it holds none, or this run's own):
    result names follow MeZO's, which leave the method and its hyperparameters to --tag."""
    if not os.path.exists(path):
        return None
    try:
        theirs = default_settings() | read_result(path)[1]["settings"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a result of this project's
        return f"{path} holds a result whose settings cannot be read"
    ours = recorded_settings(args)
    theirs = {k: portable(v) for k, v in theirs.items()}  # (results once recorded absolute paths)
    for settings in (ours, theirs):  # the same model, wherever its folder is
        settings["model_name"] = settings["model_name"].rstrip("/").split("/")[-1]
    differing = [k for k in sorted(ours) if ours[k] != theirs.get(k) and not BOOKKEEPING.fullmatch(k)]
    if not differing:
        return None
    shown = ", ".join(f"{k} {theirs.get(k)!r} (here {ours[k]!r})" for k in differing[:3])
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    return f"{path} holds another run's result: {shown}{more}"


def refuse_overwriting_other_results(args):
    if args.no_eval:
        return
    for path in result_paths(args):
        if (problem := result_conflict(args, path)) is not None:
            raise UsageError(f"{problem}; name this run apart with --tag or --result_file, or move that file")


# ---------------------------------------------------------------------------------------------------------
# Model loading


def pick_dtype(args):
    return torch.float16 if args.load_float16 else torch.bfloat16 if args.load_bfloat16 else torch.float32


def product_dtype(args):
    """The dtype the run's matrix products are in: its weights', or a --bf16 / --fp16 autocast's."""
    dtype = pick_dtype(args)
    if dtype == torch.float32 and (args.bf16 or args.fp16):
        return torch.bfloat16 if args.bf16 else torch.float16
    return dtype


def load_model(args):
    path = args.model_path or args.model_name
    kwargs = {"dtype": pick_dtype(args)}
    if args.load_int8:
        if not torch.cuda.is_available():
            raise UsageError("--load_int8 needs a CUDA GPU; drop it on this machine")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise UsageError("--load_int8 needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if world_size() > 1:
        if not args.fsdp:  # a full replica per process, on its own device; FSDP shards the CPU copy itself
            kwargs["device_map"] = {"": args.device}
    elif torch.cuda.is_available() and not args.no_auto_device:
        kwargs["device_map"] = "auto"  # MeZO's multi-GPU mode: shard layers over the visible GPUs
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise UsageError(
            f"cannot load model {path!r} ({str(error).splitlines()[0]}); give a hub name or a local folder "
            "with config.json (offline model: python utils.py prepare-model smollm2)"
        ) from None
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied and (args.untie_emb or args.linear_probing):  # the probe rewrites head rows, not embeddings
        untie_embeddings(model)
    return model


def load_tokenizer(args, model_config):
    tokenizer = AutoTokenizer.from_pretrained(args.model_path or args.model_name)
    if model_config.model_type == "opt" and tokenizer_adds_bos(tokenizer):
        # MeZO sets OPT's BOS to id 0 (`<s>`) instead of the `</s>` its tokenizer prepends.
        tokenizer.bos_token_id = 0
        tokenizer.add_bos_token = True  # rebuilds the post-processor with the new BOS
        tokenizer._lozo_adds_bos = None
    if model_config.model_type == "llama" or tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = 0  # as MeZO for LLaMA: there is no pad token (id 0 is <unk>)
    return tokenizer


def align_special_tokens_quietly(model, tokenizer):
    """Give the model config the special-token ids the tokenizer uses (MeZO's BOS for OPT, pad id 0 for
    Llama). HF's Trainer does the same when it starts, with a warning on every run that asks nothing of
    the user; done here first, it finds nothing to change."""
    hf_logger = logging.getLogger("transformers.trainer_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        align_special_tokens(model, tokenizer)
    finally:
        hf_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------------
# Evaluation and training


class Framework:
    def __init__(self, args, task):
        self.args, self.task = args, task
        self.interrupted = False  # training stopped by SIGTERM / SIGUSR1 (--save_on_interrupt)
        self.template = task.get_template()
        # Seeded before anything draws (as MeZO's run.py): LoRA's initial factors come from torch's global
        # generator, and two runs with the same --seed must start from the same adapter.
        set_seed(args.seed)
        model = load_model(args)
        self.tokenizer = load_tokenizer(args, model.config)
        align_special_tokens_quietly(model, self.tokenizer)
        self.model = apply_tuning_mode(model, args)
        self.device = next(self.model.parameters()).device
        # peft's prefixes occupy the KV cache, so the shared prompt cannot be cached on top of them.
        self.can_cache_prompt = not (
            isinstance(self.model, PeftModel) and self.model.active_peft_config.is_prompt_learning
        )
        self.kept_prompt = None  # (ids, KV cache) of a recent prompt: see prompt_cache

    # ---- scoring ----

    @torch.no_grad()
    def option_log_probs(self, encodings, option_lens):
        """Log-probabilities of the last option_len tokens of each candidate, all candidates in one padded
        forward. The prompt they share (demonstrations and input) runs once and is reused from the KV cache:
        in-context learning costs one long forward per sample instead of one per candidate."""
        self.model.eval()
        prefix = shared_prefix_length(encodings, option_lens) if self.can_cache_prompt else 0
        batch = DataCollatorWithPaddingAndNesting(self.tokenizer.pad_token_id)(
            [
                {"input_ids": ids[prefix:], "option_len": n}
                for ids, n in zip(encodings, option_lens, strict=True)
            ]
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = target_mask(batch["input_ids"], batch["attention_mask"], batch["option_len"], -1)
        if prefix:
            cache = self.prompt_cache(encodings[0][:prefix])
            cache.batch_repeat_interleave(len(encodings))
            batch["attention_mask"] = F.pad(batch["attention_mask"], (prefix, 0), value=1)
            logits = target_logits(self.model, batch, mask, past_key_values=cache)
        else:
            logits = target_logits(self.model, batch, mask)
        rows, log_probs = target_log_probs(logits, batch["input_ids"], mask)
        return [log_probs[rows == row].cpu() for row in range(len(encodings))]

    def prompt_cache(self, prompt):
        """The KV cache of `prompt` (ids). Samples evaluated with one demonstration set share the start of
        their prompts, and a position's keys and values depend only on the ids up to it: the cache of a
        recent prompt is kept and only the rest of each prompt runs, so in-context learning with one set
        costs about what zero-shot does. Kept within one evaluate() only: the weights change between them."""
        kept_ids, kept = self.kept_prompt or ((), None)
        reused = common_prefix_length(kept_ids, prompt)
        if reused < MIN_SHARED_PREFIX:
            # Only the cache is needed from the prompt: skip its projection onto the vocabulary.
            cache = self.forward_last_position(self.as_batch(prompt), use_cache=True).past_key_values
            if all(getattr(layer, "is_croppable", False) for layer in getattr(cache, "layers", [None])):
                self.kept_prompt = (prompt, copy.deepcopy(cache))
            return cache
        cache = copy.deepcopy(kept)
        cache.crop(reused - len(kept_ids))
        if reused < len(prompt):
            rest = self.as_batch(prompt[reused:])
            cache = self.forward_last_position(rest, past_key_values=cache, use_cache=True).past_key_values
        return cache

    def as_batch(self, ids):
        return torch.tensor([ids], device=self.device)

    def forward_last_position(self, input_ids, **kwargs):
        """The model on `input_ids`, projecting onto the vocabulary at the last position only."""
        last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        return self.model(input_ids=input_ids, **kwargs, **last_only)

    @torch.no_grad()
    def generate(self, input_ids):
        args, tokenizer = self.args, self.tokenizer
        newline = tokenizer.encode(args.eos_token, add_special_tokens=False)[-1]
        ids = self.as_batch(input_ids)
        output = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=args.sampling,
            temperature=args.temperature,
            num_beams=args.num_beams,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=min(args.max_new_tokens, args.max_length - len(input_ids)),
            eos_token_id=[newline, tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer.decode(output[0, len(input_ids) :], skip_special_tokens=True).strip()

    def encode(self, demos, sample, **flags):
        args = self.args
        return encode_prompt(
            self.task,
            self.template,
            demos,
            sample,
            self.tokenizer,
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
            generation=self.task.generation,
            **flags,
        )

    def one_step_pred(self, demos, sample):
        """Prediction for one sample: greedy answer (generation) or the best-scoring candidate."""
        if self.task.generation:
            (input_ids,), _ = self.encode(demos, sample)
            answer = self.generate(input_ids)
            if self.args.verbose:
                logger.info("generated %r, gold %r", answer, sample.correct_candidate)
            return Prediction(sample.correct_candidate, answer)
        return self.best_candidate(sample, self.one_sample_scores(demos, sample))

    def one_sample_scores(self, demos, sample):
        """Each candidate's score, the sample alone: mean option log-prob, or with --sfc / --icl_sfc the
        calibrated sum."""
        log_probs = self.option_log_probs(*self.encode(demos, sample))
        if self.args.sfc or self.args.icl_sfc:
            calibration = self.option_log_probs(
                *self.encode(demos, sample, sfc=self.args.sfc, icl_sfc=self.args.icl_sfc)
            )
            return [(lp.sum() - cal.sum()).item() for lp, cal in zip(log_probs, calibration, strict=True)]
        return [lp.mean().item() for lp in log_probs]

    def best_candidate(self, sample, scores):
        if self.args.verbose:
            logger.info(
                "candidates %s scores %s gold %r", sample.candidates, scores, sample.correct_candidate
            )
        return Prediction(correct_index(sample), int(np.argmax(scores)))

    @torch.no_grad()
    def batch_scores(self, pairs):
        """Each candidate's score for several (demos, sample) pairs from one forward of all their candidates,
        batched as training batches are: one row per sample when every option is one token, rows packed."""
        self.model.eval()
        features = [classification_features(*self.encode(demos, sample), 0) for demos, sample in pairs]
        batch = DataCollatorWithPaddingAndNesting(self.tokenizer.pad_token_id)(features)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = target_mask(batch["input_ids"], batch["attention_mask"], batch["option_len"], -1)
        logits = target_logits(self.model, batch, mask, pack=self.args.padding_free)
        scores = option_scores(logits, batch, mask)[0].cpu()
        return [row[: len(sample.candidates)] for (_, sample), row in zip(pairs, scores, strict=True)]

    def batch_pred(self, pairs):
        scores = self.batch_scores(pairs)
        return [
            self.best_candidate(sample, row.tolist()) for (_, sample), row in zip(pairs, scores, strict=True)
        ]

    def samples_per_forward(self, shared_demos):
        """--per_device_eval_batch_size samples per forward where the score is the plain mean log-prob;
        one at a time (MeZO's way) for generation, calibration (--sfc, --icl_sfc), and demonstrations shared
        by all samples, whose prompt the KV cache then runs once for them all (see prompt_cache)."""
        args = self.args
        if self.task.generation or args.sfc or args.icl_sfc or shared_demos:
            return 1
        return max(1, args.per_device_eval_batch_size)

    def evaluate(self, train_samples, eval_samples, one_train_set_per_eval_sample=False, desc="eval"):
        rank, shards = self.eval_shard()
        pairs = [
            (train_samples[i] if one_train_set_per_eval_sample else train_samples, eval_samples[i])
            for i in range(rank, len(eval_samples), shards)
        ]
        size = self.samples_per_forward(bool(train_samples) and not one_train_set_per_eval_sample)
        predictions = []
        self.kept_prompt = None
        try:
            with tqdm(total=len(pairs), desc=desc, disable=not eval_samples or rank > 0) as progress:
                for start in range(0, len(pairs), size):
                    chunk = pairs[start : start + size]
                    predictions += self.batch_pred(chunk) if size > 1 else [self.one_step_pred(*chunk[0])]
                    progress.update(len(chunk))
        finally:
            self.kept_prompt = None  # its keys and values belong to these weights (and free its memory)
        if shards > 1:
            parts = [None] * shards
            torch.distributed.all_gather_object(parts, predictions)
            predictions = [parts[i % shards][i // shards] for i in range(len(eval_samples))]
        metric = "f1" if self.task.generation else "accuracy"
        return {metric: calculate_metric(predictions, metric)}

    # ---- linear probing ----

    @torch.no_grad()
    def head_features(self, samples):
        """(final hidden state where each sample's first option token is predicted, gold index) per sample,
        and the label words (each candidate's first option token, the same for every sample)."""
        self.model.eval()
        features, labels, label_words, multi_token_options = [], [], None, False
        for sample in samples:
            encodings, option_lens = self.encode([], sample)
            words = [ids[-n] for ids, n in zip(encodings, option_lens, strict=True)]
            if label_words is None:
                label_words = words
            if words != label_words or len(set(words)) < len(words):
                raise UsageError(
                    "--linear_probing needs distinct label words shared by all samples; "
                    f"{self.args.task_name} gives {self.tokenizer.convert_ids_to_tokens(words)}"
                )
            multi_token_options = multi_token_options or max(option_lens) > 1
            prompt = self.as_batch(encodings[0][: -option_lens[0]])
            with HeadInputs(self.model) as head_inputs:
                self.forward_last_position(prompt)
            features.append(head_inputs.captured[0, -1].double().cpu())
            labels.append(correct_index(sample, first_only=True))
        if multi_token_options:
            logger.warning("multi-token options: the probe sets only their first token's LM-head row")
        return torch.stack(features).numpy(), np.array(labels), label_words

    def linear_probe(self, train_samples):
        """MeZO's linear probing: fit the classifier on the train samples' features, write it into the LM
        head rows of the label words. Scoring the candidates then makes the classifier's predictions."""
        features, labels, label_words = self.head_features(train_samples)
        weights = fit_linear_probe(
            features, labels, len(label_words), self.args.lp_early_stopping, seed=self.args.seed
        )
        write_head_rows(self.model, label_words, weights)
        return weights, label_words

    def eval_shard(self):
        """(this process's shard, number of shards) of evaluation. Several processes each predict every
        n-th sample and gather the predictions: all ranks get the metric (model selection must agree on
        it) for 1/n of the work. FSDP ranks evaluate everything in lockstep: every forward is collective."""
        args = self.args
        if args.world_size == 1 or args.fsdp:
            return 0, 1
        return args.process_index, args.world_size

    # ---- training ----

    def training_features(self, samples):
        """MeZO's encoding of training samples: the gold sequence (or all candidates for classification)."""
        args, features = self.args, []
        for sample in samples:
            if args.non_diff:
                (ids,), _ = self.encode([], sample)
                features.append({"input_ids": ids, "gold": sample.correct_candidate})
                continue
            encodings, option_lens = self.encode([], sample, generation_with_gold=True)
            gold = correct_index(sample, first_only=True)
            if args.train_as_classification:
                features.append(classification_features(encodings, option_lens, gold))
            elif args.only_train_option:
                features.append({"input_ids": encodings[gold], "option_len": option_lens[gold]})
            else:
                features.append({"input_ids": encodings[gold]})
        return features

    def train(self, train_samples, dev_samples):
        args = self.args
        collator = (NondiffCollator if args.non_diff else DataCollatorWithPaddingAndNesting)(
            self.tokenizer.pad_token_id
        )
        try:
            trainer = LowRankTrainer(
                model=self.model,
                args=args,
                train_dataset=self.training_features(train_samples),
                eval_dataset=dev_samples,  # evaluated by evaluate_func with the task metric
                data_collator=collator,
                processing_class=self.tokenizer,
                evaluate_func=lambda: self.evaluate([], dev_samples, desc="dev"),
            )
        except ValueError as error:  # conflicting HF training arguments
            raise UsageError(str(error).strip().splitlines()[0]) from None
        trainer.train(resume_from_checkpoint=resume_point(args))
        trainer.save_state()  # trainer_state.json: the loss and eval history, for plots (rank 0 writes)
        self.interrupted = trainer.interrupt is not None and trainer.interrupt.interrupted
        if args.save_model and not self.interrupted:
            trainer.save_model()
        self.model = trainer.model
        self.device = next(self.model.parameters()).device  # FSDP moved the CPU-loaded model to the GPU
        return trainer


MIN_SHARED_PREFIX = 32  # below this, caching the shared prompt saves less than it costs


def common_prefix_length(a, b):
    """How many leading ids `a` and `b` share."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def shared_prefix_length(encodings, option_lens):
    """How many leading ids all candidates share that no candidate scores (0 when not worth caching)."""
    if len(encodings) < 2:
        return 0
    unscored = min(len(ids) - n - 1 for ids, n in zip(encodings, option_lens, strict=True))
    common = min(common_prefix_length(encodings[0], ids) for ids in encodings[1:])
    prefix = min(common, unscored)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def resume_point(args):
    """The checkpoint --resume_from_checkpoint names: `last` is the newest complete one in --output_dir (or
    none: a fresh start); an explicit folder must be complete."""
    wanted, with_optimizer = args.resume_from_checkpoint, not args.save_only_model
    if wanted is None:
        return None
    if wanted == "last":
        found = last_complete_checkpoint(args.output_dir, with_optimizer)
        if found is None:
            logger.info("no complete checkpoint in %s: starting from the beginning", args.output_dir)
        else:
            logger.info("resuming from %s", found)
        return found
    problem = checkpoint_problem(wanted, with_optimizer)
    if problem is not None:
        raise UsageError(
            f"--resume_from_checkpoint {wanted}: {problem}; give a complete checkpoint folder, or `last` for "
            "the newest complete one in --output_dir"
        )
    return wanted


def correct_index(sample, first_only=False):
    """Index of the gold candidate; ReCoRD has several (all of them, or the first for training)."""
    if sample.candidates is None:
        return 0
    if isinstance(sample.correct_candidate, list):
        indices = [sample.candidates.index(c) for c in sample.correct_candidate]
        return indices[0] if first_only else indices
    return sample.candidates.index(sample.correct_candidate)


# ---------------------------------------------------------------------------------------------------------


# What most runs set, listed first by --help.
COMMON_OPTIONS = (
    "task_name", "model_name", "trainer", "learning_rate", "zo_eps", "max_steps",
    "per_device_train_batch_size", "num_train", "train_set_seed", "load_float16",
)  # fmt: skip
USAGE = """Zero-shot, in-context learning and fine-tuning (first-order, MeZO, LOZO, LOZO-M) of a Hugging Face
causal LM on MeZO's tasks, with only forward passes for the zeroth-order trainers. Each run writes a
result JSON into result/ (or --result_file). For example, LOZO on SST-2 as in the LOZO paper:

  python run_lozo.py --task_name SST2 --model_name facebook/opt-13b --trainer LOZO --learning_rate 1e-7 \\
      --zo_eps 1e-3 --rank_r 2 --step_interval 50 --max_steps 20000 --num_train 1000 --num_dev 500 \\
      --train_set_seed 0 --load_float16

The ten options most runs need come first, then the project's own, then every transformers
TrainingArguments option (the launchers lozo.sh, mezo.sh, finetune.sh and icl.sh set them from variables)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The usage paragraph as written, and every option's default."""


def build_parser():
    """HfArgumentParser over OurArguments: a usage paragraph, the common options first, then the project's
    own, then HF's."""
    parser = HfArgumentParser(
        OurArguments,
        usage="python run_lozo.py --task_name TASK --model_name MODEL [--trainer TRAINER] [options]",
        description=USAGE,
        formatter_class=HelpFormatter,
    )
    ours = {f.name for f in dataclasses.fields(OurArguments)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }

    def place(action):
        if action.dest in COMMON_OPTIONS:
            return 0, COMMON_OPTIONS.index(action.dest)
        return (1 if action.dest in ours else 2), 0

    for group in parser._action_groups:  # argparse has no public reordering; the order is display only
        group._group_actions.sort(key=place)
    return parser


def parse_args(argv):
    parser = build_parser()
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks
        raise UsageError(str(error).strip().splitlines()[0]) from None
    return args


def resolved_settings(args):
    """Every resolved argument, enums by value, JSON-ready (as MeZO prints its arguments)."""
    values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in dataclasses.asdict(args).items()}
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in values.items()}


def recorded_settings(args):
    """The resolved arguments as a result records them: paths relative to the working folder."""
    return {k: portable(v) for k, v in resolved_settings(args).items()}


@functools.cache
def default_settings():
    return resolved_settings(OurArguments())


def format_arguments(args):
    """The arguments that differ from the defaults, each on its own line (all of them with --verbose);
    the data folder always, since $LOZO_DATA_DIR may have chosen it."""
    values, defaults = resolved_settings(args), default_settings()
    shown = {k: v for k, v in values.items() if args.verbose or v != defaults.get(k) or k == "data_dir"}
    return "\n".join(f"  {k} = {v!r}" for k, v in sorted(shown.items()))


def run(args):
    started = time.time()
    provenance()  # the commit now, before hours of training in a work tree that may change meanwhile
    refuse_overwriting_other_results(args)  # before hours of training, not after
    logger.info(
        "arguments%s:\n%s",
        "" if args.verbose else " (those not at their defaults; --verbose: all)",
        format_arguments(args),
    )
    task = tasks.get_task(args.task_name, args.data_dir)
    framework = Framework(args, task)
    train_sets = task.sample_train_sets(
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_eval=args.num_eval,
        num_train_sets=args.num_train_sets,
        seed=args.train_set_seed,
    )
    os.makedirs("result", exist_ok=True)
    outcomes = []
    if args.train_set_seed is None and args.num_train_sets is None:
        # In-context default: one demonstration set per evaluation sample.
        eval_samples = task.sample_eval_samples(args.num_eval, seed=0)
        metrics = framework.evaluate(train_sets, eval_samples, one_train_set_per_eval_sample=True)
        (output,) = result_paths(args)
        samples = {"demonstrations per eval sample": args.num_train, "eval": len(eval_samples)}
        outcomes.append(finish(args, metrics, output, started, samples))
        log_summary(args, outcomes, started)
        return metrics
    metrics = None
    for set_id, (train_set, output) in enumerate(zip(train_sets, result_paths(args), strict=True)):
        set_seed = set_id if args.train_set_seed is None else args.train_set_seed
        eval_samples = task.sample_eval_samples(args.num_eval, seed=set_seed)
        trainer = adapter = None
        samples = {"train set seed": set_seed, "eval": len(eval_samples)}
        if args.trainer == "none" and not args.linear_probing:
            metrics = framework.evaluate(train_set, eval_samples)
            samples["demonstrations"] = len(train_set)
        else:
            train_samples, dev_samples = tasks.split_train_dev(train_set, args.num_dev)
            samples |= {"train": len(train_samples), "dev": len(dev_samples)}
            if not train_samples:
                raise UsageError(
                    f"no training samples left: --num_dev {args.num_dev} takes all {len(train_set)} sampled "
                    "rows; lower --num_dev"
                )
            # As MeZO: without dev samples, evaluation during training uses the eval samples.
            if args.linear_probing:
                framework.linear_probe(train_samples)
                if args.save_model and args.process_index == 0:  # the probed head lives in the model only
                    framework.model.save_pretrained(args.output_dir)
                    framework.tokenizer.save_pretrained(args.output_dir)
            else:
                trainer = framework.train(train_samples, dev_samples or eval_samples)
                if framework.interrupted:  # a partial run has no result: it resumes with the same command
                    logger.warning(
                        "interrupted: checkpoint saved in %s; run the same command with "
                        "--resume_from_checkpoint last to continue",
                        args.output_dir,
                    )
                    return None
            if isinstance(framework.model, PeftModel) and args.process_index == 0:  # replicas are identical
                adapter = os.path.splitext(output)[0] + "-adapter"
                save_adapter(framework.model, adapter)
            if args.no_eval:
                outcomes.append({"metrics": None, "result": None, "trainer": trainer, "adapter": adapter})
                continue
            metrics = framework.evaluate([], eval_samples)
            if dev_samples:
                dev = framework.evaluate([], dev_samples, desc="dev")
                metrics |= {f"dev_{k}": v for k, v in dev.items()}
        outcomes.append(finish(args, metrics, output, started, samples, trainer, adapter))
    log_summary(args, outcomes, started)
    return metrics


@functools.cache
def provenance():
    """Library versions and the project's commit (with `+changes` when the work tree differs from it)."""
    names = ("torch", "transformers", "datasets", "accelerate", "peft")
    found = {"python": platform.python_version()} | {name: importlib.metadata.version(name) for name in names}
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*words):
        done = subprocess.run(["git", "-C", here, *words], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {"versions": found, "commit": commit}


def finish(args, metrics, output, started, samples, trainer=None, adapter=None):
    """Write the result file: the metrics (top level, as before) and under "run" what produced them."""
    run_info = {
        "task": args.task_name,
        "model": portable(args.model_name),
        "trainer": args.trainer,
        "samples": samples,
        "wall_time_s": round(time.time() - started, 1),
        **provenance(),
        "device": device_name(),
        "float32_products": needs_float32_products(product_dtype(args)),  # see utils.Float32Products
        "settings": recorded_settings(args),
    }
    if trainer is not None:
        history = trainer.state.log_history
        losses = [entry["loss"] for entry in history if "loss" in entry]
        run_info["train_loss_last_logged"] = losses[-1] if losses else None
        run_info["train_loss_mean"] = next(
            (e["train_loss"] for e in reversed(history) if "train_loss" in e), None
        )
        run_info["log_history"] = portable(os.path.join(args.output_dir, "trainer_state.json"))
    if adapter is not None:
        run_info["adapter"] = adapter
    if args.process_index == 0:  # under torchrun every rank holds the same metrics: one writes them
        write_metrics_to_file(metrics | {"run": run_info}, output)
    return {"metrics": metrics, "result": output, "trainer": trainer, "adapter": adapter}


def log_summary(args, outcomes, started):
    """One block at the end of every run: the metrics and every file or folder it wrote."""
    minutes, seconds = divmod(round(time.time() - started), 60)
    lines = [
        f"done in {minutes} min {seconds} s: {args.task_name}, {args.model_name}, trainer {args.trainer}"
    ]
    for outcome in outcomes:
        if outcome["metrics"] is not None:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in outcome["metrics"].items())
            lines += [f"  {shown}", f"  result:     {outcome['result']}"]
        if outcome["trainer"] is not None:
            checkpoints = sorted(p.name for p in Path(args.output_dir).glob("checkpoint-*"))
            saved = "model saved; " if args.save_model else ""
            lines.append(
                f"  output:     {args.output_dir} ({saved}checkpoints: {', '.join(checkpoints) or 'none'}; "
                "log: trainer_state.json)"
            )
        if outcome["adapter"] is not None:
            lines.append(f"  adapter:    {outcome['adapter']}")
    logger.info("\n".join(lines))


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        with products_for(product_dtype(args)):
            run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
