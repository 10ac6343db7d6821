"""LOZO, LOZO-M and MeZO: zeroth-order training through the hooks of `transformers.Trainer`.

`ZOOptimizer` (zo_optimizer.py) owns the method: the random directions, the V factors, momentum and the step
count; LOZO's matrices reach the model through its side path (side_path.py). The HF training loop drives it
unchanged: `LowRankTrainer.training_step` measures the two perturbed losses, `optimizer.step()` applies the
update, the lr scheduler moves `lr`, and checkpoints (checkpoints.py: written whole or not at all) carry
`optimizer.state_dict()`.
"""

import functools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from checkpoints import (  # noqa: F401  (re-exported: the scripts and tests import them from here)
    STAGING_DIR,
    TRAJECTORY_NAME,
    SaveOnInterruptCallback,
    checkpoint_problem,
    holds_steps,
    last_complete_checkpoint,
)
from metrics import f1
from side_path import stochastic_round  # noqa: F401
from utils import UsageError, model_option_loss, paired, replace_folder
from zo_optimizer import PAIR, U_STREAM, V_STREAM, ZOOptimizer, gaussian, stream_seed  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class ZOArguments:
    """The zeroth-order settings of `LowRankTrainer`, for scripts that pass HF's own `TrainingArguments`
    (run_lozo.py's arguments carry the same fields, with the same defaults, as command-line options)."""

    trainer: str = "LOZO"  # "LOZO" (LOZO, LOZO-M), "zo" (MeZO) or "regular" (HF's first-order step)
    zo_eps: float = 1e-3  # perturbation scale ε
    rank_r: int = 2  # LOZO: rank r of U·Vᵀ
    step_interval: int = 50  # LOZO: ν, V is redrawn every ν steps
    lozo_optimizer: str = "sgd"  # "sgdm": LOZO-M
    beta1: float = 0.9  # LOZO-M: momentum β
    merge_periods: int = 8  # LOZO: V periods kept as factors before they are written into the weights
    zo_in_place: bool = False  # MeZO: MeZO's own in-place arithmetic
    zo_master_weights: bool = False  # MeZO: a float32 master copy of the weights
    zo_compensated: bool = False  # MeZO: half-precision updates carried in a compensation buffer (Kahan)
    zo_batched_pair: bool = False  # θ ± εZ_k of every direction k as one forward of the batch 2q times
    zo_queries: int = 1  # directions a step; the update averages them
    zo_trajectory_checkpoints: bool = False  # checkpoints record the steps, not the weights
    save_on_interrupt: bool = False  # SIGTERM / SIGUSR1: checkpoint after this step and stop
    padding_free: bool = True  # pack a batch's sequences side by side (sdpa attention)


class LowRankTrainer(Trainer):
    """`--trainer regular` trains with the stock HF path; `zo` (MeZO) and `LOZO` (LOZO, LOZO-M) replace the
    training step by two forward passes. All trainers share MeZO's losses (`utils.option_loss`), and
    evaluation during training runs `evaluate_func` (the task metric on the dev samples)."""

    def __init__(self, *args, zo_args=None, evaluate_func=None, tokenizer_for_generation=None, **kwargs):
        self._zo_args = zo_args  # else the zeroth-order settings are read from `args` (run_lozo.py's)
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss averages itself; HF divides by accumulation
        self.evaluate_func = evaluate_func
        self.generation_tokenizer = tokenizer_for_generation
        self.zo_optimizer = None
        self._micro_batches = 0
        self._loss_sums = None
        self._last_finite_loss = None
        if self.is_zo:
            # A skipped step reports the last finite loss (or NaN before any); HF's filter would log it as 0.
            self.args.logging_nan_inf_filter = False
        self.interrupt = SaveOnInterruptCallback() if self.zo.save_on_interrupt else None
        if self.interrupt is not None:
            self.add_callback(self.interrupt)
        self._staging = False

    @property
    def zo(self):
        """The zeroth-order settings: `zo_args`, or `args` when run_lozo.py's arguments carry them."""
        return self._zo_args if self._zo_args is not None else self.args

    @property
    def is_zo(self):
        return self.zo.trainer in ("zo", "LOZO")

    @property
    def saves_trajectories(self):
        """--zo_trajectory_checkpoints: a checkpoint holds the steps taken, not the weights they made."""
        return self.is_zo and self.zo.zo_trajectory_checkpoints

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.is_zo:
            # Data-parallel replicas exchange two losses per step, never gradients: accelerate's evaluation
            # mode places the model without wrapping it in DistributedDataParallel (no buckets, no broadcast).
            self.accelerator.prepare_model = functools.partial(
                self.accelerator.prepare_model, evaluation_mode=True
            )

    # ---- optimizer ----

    def create_optimizer(self, model=None):
        if self.is_zo and self.optimizer is None:
            args = self.zo
            lozo = args.trainer == "LOZO"
            self.optimizer_cls_and_kwargs = (
                ZOOptimizer,
                dict(
                    lr=self.args.learning_rate,
                    eps=args.zo_eps,
                    seed=self.args.seed,
                    low_rank=lozo,
                    rank=args.rank_r,
                    step_interval=args.step_interval,
                    momentum=args.beta1 if lozo and args.lozo_optimizer == "sgdm" else None,
                    in_place=args.zo_in_place,
                    master_weights=args.zo_master_weights,
                    merge_periods=args.merge_periods,
                    batched_pair=args.zo_batched_pair,
                    compensated=args.zo_compensated,
                    queries=args.zo_queries,
                    names={id(p): n for n, p in (model or self.model).named_parameters()},
                    replayable=self.saves_trajectories,
                ),
            )
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, ZOOptimizer):
            self.zo_optimizer = optimizer
            optimizer.attach(model or self.model)
        return optimizer

    # ---- losses ----

    def loss_sum(self, model, inputs, copies=1):
        """(summed loss, number of items) of a batch, so that batches can be combined exactly; with `copies`
        n > 1 ([summed loss of each copy], number of items) from one forward of the batch n times."""
        if "gold" in inputs:
            return self.negative_f1_sum(model, inputs, copies)
        pad, pack = self.pad_token_id, self.zo.padding_free
        losses = model_option_loss(model, inputs, pad, reduction="sum", pack=pack, copies=copies)
        return ([total for total, _ in losses], losses[0][1]) if copies > 1 else losses

    @property
    def pad_token_id(self):
        return self.processing_class.pad_token_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = self.loss_sum(model, inputs)
        loss = total / count
        return (loss, None) if return_outputs else loss

    def negative_f1_sum(self, model, inputs, copies=1):
        """--non_diff: minus the F1 of greedy answers (SQuAD-style), a loss only ZO methods can use."""
        args, tokenizer = self.args, self.processing_class
        newline = tokenizer.encode(args.eos_token, add_special_tokens=False)[-1]
        prompts = paired({k: inputs[k] for k in ("input_ids", "attention_mask")}, copies)
        # With several GPUs in one process HF wraps the model in DataParallel, which has no generate().
        output = self.accelerator.unwrap_model(model).generate(
            **prompts,
            do_sample=False,
            num_beams=1,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=[newline, tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        golds = inputs["gold"] * copies
        scores = torch.tensor([f1(answer.strip(), gold) for answer, gold in zip(answers, golds, strict=True)])
        sums = [-copy.sum().to(inputs["input_ids"].device) for copy in scores.chunk(copies)]
        return (sums if copies > 1 else sums[0]), len(inputs["gold"])

    # ---- the zeroth-order step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.is_zo:
            return super().training_step(model, inputs, num_items_in_batch)
        return self.zo_training_step(model, inputs)

    @torch.no_grad()
    def zo_training_step(self, model, inputs):
        """The losses at θ ± εZ for each of the step's directions (two forward passes each, or one forward of
        the batch 2q times for all q). Micro-batches of one optimisation step share the directions; their
        losses are summed and g is formed at the last one, which leaves the model perturbed for
        `optimizer.step()` to end."""
        model.eval()  # dropout off: both losses must see the same function
        inputs = self._prepare_inputs(inputs)
        optimizer = self.zo_optimizer
        if isinstance(model, torch.nn.DataParallel) and (optimizer.matrices or optimizer.transient):
            raise UsageError(
                "the zeroth-order hooks do not follow DataParallel's model copies (several GPUs in one "
                "process); run one process per GPU with torchrun (NUM_GPU=N), or drop --no_auto_device"
            )
        queries = optimizer.queries
        if self._micro_batches == 0:
            optimizer.begin_step()
            self._loss_sums = torch.zeros(queries, 3, dtype=torch.float64)
        step_loss = 0.0
        for query, (loss_plus, loss_minus, count) in enumerate(self.two_point_losses(model, inputs)):
            sums = [float(loss_plus), float(loss_minus), count]
            self._loss_sums[query] += torch.tensor(sums, dtype=torch.float64)
            step_loss += float(loss_plus + loss_minus) / (2 * count * queries)
        self._micro_batches += 1
        if self.accelerator.gradient_state.sync_gradients:
            self._micro_batches = 0
            optimizer.set_projected_grad(self._projected_grad())
        if math.isfinite(step_loss):
            self._last_finite_loss = step_loss
        elif self._last_finite_loss is not None:
            step_loss = self._last_finite_loss
        return torch.tensor(step_loss / self.current_gradient_accumulation_steps, device=self.args.device)

    def two_point_losses(self, model, inputs):
        """[(L(θ+εZ_k), L(θ−εZ_k), items) of each direction k], sums: from two forwards per direction, or
        (--zo_batched_pair) from one forward of the batch 2q times; the model stays perturbed. If anything
        fails in between (out of memory, Ctrl-C), it is put back at θ before the error propagates."""
        optimizer, queries = self.zo_optimizer, self.zo_optimizer.queries
        try:
            if self.zo.zo_batched_pair:
                optimizer.move_to(PAIR)
                losses, count = self.loss_sum(model, inputs, copies=2 * queries)
                return [(*losses[2 * k : 2 * k + 2], count) for k in range(queries)]
            evaluated = []
            for query in range(queries):
                if queries > 1 and (query or self._micro_batches):
                    optimizer.begin_query(query)
                optimizer.move_to(+1)
                loss_plus, count = self.loss_sum(model, inputs)
                optimizer.move_to(-1)
                loss_minus, _ = self.loss_sum(model, inputs)
                evaluated.append((loss_plus, loss_minus, count))
        except BaseException:
            optimizer.move_to(0)
            self._micro_batches = 0
            raise
        return evaluated

    # Between steps the model computes with θ, but a LOZO matrix's recent updates live in its low-rank
    # factors: a checkpoint first writes them into the weights (settle), and the end of training also
    # detaches the optimizer from the model (release) before HF may load the best checkpoint.

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint (model, optimizer with the ZO state, scheduler, RNG states, trainer state), written
        into <output_dir>/.incomplete/checkpoint-N and renamed to <output_dir>/checkpoint-N once complete: a
        kill at any moment leaves the whole checkpoint or none of it. Rank 0 renames, after every rank has
        written its RNG state; HF's rotation (--save_total_limit) then sees complete checkpoints only."""
        if self.zo_optimizer is not None and not self.saves_trajectories:
            self.zo_optimizer.settle()
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # what a kill during an earlier attempt left
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))  # naming the final folder
            replace_folder(staged, final)
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()

    # A trajectory checkpoint (--zo_trajectory_checkpoints) writes no weights and never settles, so saving one
    # leaves the run's arithmetic untouched; resuming replays its steps onto the starting weights.

    def save_model(self, output_dir=None, _internal_call=False):
        """Writes the effective weights whenever it is called (a callback, user code, the end of training):
        HF's save reads model.state_dict(), which settles the optimizer first (see ZOOptimizer.attach)."""
        if self._staging and self.saves_trajectories:
            return  # a checkpoint being written: the steps stand in for the weights
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.saves_trajectories:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, TRAJECTORY_NAME), "w") as f:
                json.dump(self.zo_optimizer.record(), f)
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not holds_steps(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.is_zo:
            raise UsageError(
                f"{resume_from_checkpoint} records zeroth-order steps, not weights; resume it with the "
                "trainer that wrote it (--trainer zo or LOZO)"
            )
        # The model keeps its starting weights: _load_optimizer_and_scheduler replays the steps onto them.

    def _replay_checkpoint(self, checkpoint):
        with open(os.path.join(checkpoint, TRAJECTORY_NAME)) as f:
            record = json.load(f)
        if len(record["steps"]) != self.state.global_step:
            raise UsageError(
                f"{checkpoint} records {len(record['steps'])} steps but its trainer state is at step "
                f"{self.state.global_step}; resume from another checkpoint"
            )
        logger.info("replaying %d zeroth-order steps from %s", len(record["steps"]), checkpoint)
        self.zo_optimizer.replay(record)
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)
        for group, lr in zip(self.zo_optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the rate of the next step, as a loaded optimizer state would hold it

    def _finalize_training(self, *args, **kwargs):
        if self.zo_optimizer is not None:
            self.zo_optimizer.release()
        return super()._finalize_training(*args, **kwargs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # also after an exception between steps (Ctrl-C): the model holds θ, unhooked
            if self.zo_optimizer is not None:
                self.zo_optimizer.release()
            self._micro_batches = 0

    def _issue_warnings_after_load(self, load_result):
        """A tied LM head (OPT, SmolLM2) is saved once, under the embeddings' name: its key is missing from
        every checkpoint by design, so only other missing keys are worth a warning."""
        seen, tied = set(), set()
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and holds_steps(checkpoint):
            self._replay_checkpoint(checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None and self.saves_trajectories:
                self.zo_optimizer.record()  # refused now if the steps are not all recorded, not at a save
        if checkpoint is not None and self.is_zo and self.zo_optimizer.zo_step != self.state.global_step:
            raise UsageError(
                f"checkpoint {checkpoint} has no optimizer state for step {self.state.global_step} "
                "(saved with --save_only_model?); a zeroth-order run resumes only from full checkpoints"
            )

    def _projected_grad(self):
        """g = (L+ − L−) / 2ε of the step (a list of one per direction with --zo_queries above 1)."""
        grads = []
        for loss_plus, loss_minus, count in self.reduce_loss_sums(self._loss_sums).tolist():
            grads.append((loss_plus / count - loss_minus / count) / (2 * self.zo.zo_eps))
            if not math.isfinite(grads[-1]):
                logger.warning(
                    "step %d: non-finite loss (L+=%s, L-=%s), update skipped (%d skipped so far)",
                    self.state.global_step,
                    loss_plus / count,
                    loss_minus / count,
                    self.zo_optimizer.skipped + 1,
                )
        return grads[0] if len(grads) == 1 else grads

    def reduce_loss_sums(self, sums):
        """Data-parallel ZO: sum (L+ sum, L- sum, items) over the replicas, each of which measured its share
        of the global batch. Every rank then forms the g of the whole batch and, from the shared seed, takes
        the same step: these three float64 numbers are all that crosses the network per step."""
        if self.args.world_size == 1:
            return sums
        reduced = sums.to(self.args.device, copy=True)  # nccl reduces GPU tensors only; gloo takes CPU ones
        dist.all_reduce(reduced)
        return reduced.cpu()

    def log(self, logs, *args, **kwargs):
        if self.zo_optimizer is not None and "loss" in logs:
            logs["zo_skipped_steps"] = self.zo_optimizer.skipped
            logs.pop("grad_norm", None)  # there is no gradient; HF would report 0
        super().log(logs, *args, **kwargs)

    # ---- evaluation during training: the task metric on the dev samples ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # The model computes with θ here (the hooks add the low-rank factors); nothing is merged, so how
        # often a run evaluates does not change its trajectory.
        if self.evaluate_func is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_func().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
