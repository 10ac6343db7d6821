"""LOZO, LOZO-M and MeZO: zeroth-order training through the hooks of `transformers.Trainer`.

`ZOOptimizer` owns the method: the random directions, the V factors, momentum and the step count. The HF
training loop drives it unchanged: `LowRankTrainer.training_step` measures the two perturbed losses,
`optimizer.step()` restores the weights and applies the update in one pass, the lr scheduler moves `lr`, and
checkpoints carry `optimizer.state_dict()`.

Directions, per trainable tensor W at optimisation step t:
  LOZO, 2-D W (m×n):  Z = U Vᵀ, U ~ N(0,1)^{m×r} fresh each step, V ~ N(0,1)^{n×r} redrawn at t = 0, ν, 2ν, …
  otherwise (MeZO, and 1-D tensors under LOZO): dense z ~ N(0,1) of W's shape.
Every tensor has its own random stream seeded from (run seed, step, tensor index), so Z can be regenerated
exactly, in any order and on any device, and is never stored. That is also what makes data-parallel ZO
cheap: replicas started by torchrun draw the same Z, so they need to sum only their loss sums and counts
(`LowRankTrainer.reduce_loss_sums`) to take the same step.
"""

import functools
import itertools
import logging
import math
import signal

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from metrics import f1
from utils import UsageError, option_loss, target_logits, target_mask

logger = logging.getLogger(__name__)

U_STREAM, V_STREAM = 0, 1
DENSE_CHUNK = 1 << 20  # dense noise is drawn in chunks of this many elements: no parameter-sized temporary


def stream_seed(*key):
    """A 63-bit seed that depends on every part of `key` (NumPy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def gaussian(shape, seed, device):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def dense_noise(param, seed):
    """Yield (slice of `param`, z for that slice), z ~ N(0,1) in param's dtype, chunk by chunk. z is
    overwritten by the next chunk: use it before asking for the next one."""
    generator = torch.Generator(device=param.device)
    generator.manual_seed(seed)
    flat = param.data.view(-1)
    # One buffer refilled in place (the same numbers as torch.randn): drawing is what bounds a dense step,
    # and a fresh allocation per chunk costs ~15 % more on a CPU.
    buffer = torch.empty(min(DENSE_CHUNK, flat.numel()), device=param.device, dtype=torch.float32)
    for start in range(0, flat.numel(), DENSE_CHUNK):
        part = flat[start : start + DENSE_CHUNK]
        z = buffer[: part.numel()].normal_(generator=generator)
        yield part, z.to(param.dtype)


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD along random directions (MeZO), low-rank directions (LOZO) and LOZO's momentum.

    Protocol for one optimisation step (what `LowRankTrainer.training_step` does):
        begin_step(); move_to(+1); L+ = loss; move_to(-1); L- = loss; set_projected_grad((L+ - L-) / 2ε)
        step()  # from θ - εZ: restore and update, one pass over each weight
    With `lookahead`, step() also moves on to θ' + εZ' of the next step in that same pass, so the next
    move_to(+1) is free: two passes over the weights per step instead of three. settle() returns to θ'
    wherever the weights are read (evaluation, checkpoints, the end of training).
    """

    def __init__(
        self,
        params,
        lr,
        eps=1e-3,
        seed=0,
        low_rank=False,
        rank=2,
        step_interval=50,
        momentum=None,
        weight_decay=0.0,
        lookahead=False,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.seed, self.low_rank, self.lookahead = eps, seed, low_rank, lookahead
        self.rank, self.step_interval, self.beta = rank, step_interval, momentum
        self.tensors = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])]
        self.index = {id(p): i for i, p in self.tensors}
        self.zo_step = 0  # optimisation steps taken: selects Z and the V period
        self.skipped = 0  # steps whose losses were not finite
        self.projected_grad = None
        self.V = {}  # tensor index -> V (n×r, float32), current period
        self.V_previous = {}  # during a step that redrew V: the V it replaced (LOZO-M carries momentum over)
        self.momentum = {}  # tensor index -> N (m×r) for low-rank tensors, dense momentum otherwise (float32)
        self._begun = None  # the step begin_step() last prepared (it must not redraw V twice)
        self.position = 0  # the weights are at θ + position·εZ of the current step

    def settings(self):
        """What a checkpoint must agree on to resume this run."""
        return {
            "low_rank": self.low_rank,
            "rank": self.rank,
            "step_interval": self.step_interval,
            "momentum": self.beta,
            "eps": self.eps,
            "seed": self.seed,
        }

    def is_low_rank(self, param):
        return self.low_rank and param.dim() == 2

    def begin_step(self):
        """Redraw V at steps 0, ν, 2ν, …, keeping the old V for LOZO-M's carry-over."""
        if self._begun == self.zo_step:
            return
        self._begun = self.zo_step
        self.V_previous = {}
        if not self.low_rank or self.zo_step % self.step_interval:
            return
        period = self.zo_step // self.step_interval
        self.V = dict(self.V)  # a new dict: a step in progress keeps its own V (see step())
        for i, p in self.tensors:
            if self.is_low_rank(p):
                if i in self.V:
                    self.V_previous[i] = self.V[i]
                self.V[i] = gaussian(
                    (p.shape[1], self.rank), stream_seed(self.seed, V_STREAM, period, i), p.device
                )

    def _seed(self, i, step=None):
        """Seed of tensor i's U or dense z at `step` (default: the current step)."""
        return stream_seed(self.seed, U_STREAM, self.zo_step if step is None else step, i)

    def _U(self, i, p, step=None):
        return gaussian((p.shape[0], self.rank), self._seed(i, step), p.device)

    @torch.no_grad()
    def perturb(self, scale):
        """θ += scale·ε·Z for this step's Z."""
        alpha = scale * self.eps
        for i, p in self.tensors:
            if self.is_low_rank(p):
                p.data.addmm_(self._U(i, p).to(p.dtype), self.V[i].T.to(p.dtype), alpha=alpha)
            else:
                for part, z in dense_noise(p, self._seed(i)):
                    part.add_(z, alpha=alpha)
        self.position += scale

    def move_to(self, position):
        """Put the weights at θ + position·εZ of this step (nothing to do if they are there already)."""
        if position != self.position:
            self.perturb(position - self.position)

    def settle(self):
        """Weights back at θ: undo a look-ahead perturbation before anything reads them."""
        if self.position is None:  # a step failed half-way: no single perturbation would restore θ
            logger.warning("a zeroth-order step was interrupted mid-update: the weights are not restorable")
            return
        self.move_to(0)

    def set_projected_grad(self, projected_grad):
        self.projected_grad = projected_grad

    @torch.no_grad()
    def step(self, closure=None):
        """From θ + position·εZ (θ − εZ after the two losses) restore θ and apply W ← W − η(g·Z + λW)
        (LOZO-M: W − η(N·Vᵀ + λW)), and with look-ahead add the next step's εZ', in one pass."""
        g = self.projected_grad
        if g is None:
            raise RuntimeError("ZOOptimizer.step() needs set_projected_grad() first")
        finite = math.isfinite(g)
        if not finite:
            self.skipped += 1
        restore, self.position = -self.position, None  # None until every tensor is updated (see settle())
        this_V, carried_V = self.V, self.V_previous  # this step's V, and on a redraw step the one it replaced
        step = self.zo_step
        self.zo_step += 1
        self.projected_grad = None
        self.V_previous = {}
        if self.lookahead:
            self.begin_step()  # the next step's Z: may redraw V (into a new dict; this step keeps this_V)
        # The groups are read now: the lr scheduler (and load_state_dict) replace their values.
        for group in self.param_groups:
            lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
            if not finite:  # only undo the perturbation
                lr, decay, g = 0.0, 1.0, 0.0
            for p in group["params"]:
                i = self.index[id(p)]
                if self.is_low_rank(p):
                    U = self._U(i, p, step)
                    self._step_low_rank(i, p, U, this_V[i], carried_V.get(i), g, lr, decay, restore, finite)
                else:
                    self._step_dense(i, p, self._seed(i, step), g, lr, decay, restore, finite)
        self.position = 1 if self.lookahead else 0

    def _step_low_rank(self, i, p, U, V, V_replaced, g, lr, decay, restore, finite):
        """W ← decay·(W + restore·εUVᵀ) − η(gU or N)Vᵀ [+ εU'V'ᵀ]: one addmm_, rank r (2r with look-ahead)."""
        if self.beta is None:
            left = (decay * restore * self.eps - lr * g) * U
        else:
            N = self.momentum.get(i)
            if N is not None and V_replaced is not None:  # express N in the new V's basis
                N = N @ (V_replaced.T @ V) / p.shape[1]
            if finite:
                N = (1 - self.beta) * g * U if N is None else self.beta * N + (1 - self.beta) * g * U
            if N is not None:
                self.momentum[i] = N
            left = decay * restore * self.eps * U - (0 if N is None else lr * N)
        right = V
        if self.lookahead:
            left = torch.cat([left, self.eps * self._U(i, p)], dim=1)
            right = torch.cat([V, self.V[i]], dim=1)
        p.data.addmm_(left.to(p.dtype), right.T.to(p.dtype), beta=decay)

    def _step_dense(self, i, p, seed, g, lr, decay, restore, finite):
        if self.beta is not None and i not in self.momentum and finite:
            self.momentum[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        momentum = self.momentum.get(i)  # only LOZO-M / MeZO with momentum keep any
        flat_momentum = momentum.view(-1) if momentum is not None else None
        upcoming = dense_noise(p, self._seed(i)) if self.lookahead else itertools.repeat((None, None))
        start = 0
        for (part, z), (_, z_next) in zip(dense_noise(p, seed), upcoming, strict=False):
            if decay != 1.0:
                part.mul_(decay)
            if momentum is None:
                part.add_(z, alpha=decay * restore * self.eps - lr * g)
            else:
                part.add_(z, alpha=decay * restore * self.eps)
                if finite:
                    m = flat_momentum[start : start + part.numel()]
                    m.mul_(self.beta).add_(z.float(), alpha=(1 - self.beta) * g)
                    part.add_(m.to(p.dtype), alpha=-lr)
            if z_next is not None:
                part.add_(z_next, alpha=self.eps)
            start += part.numel()

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {
            "settings": self.settings(),
            "step": self.zo_step,
            "skipped": self.skipped,
            "V": {i: v.cpu() for i, v in self.V.items()},
            "momentum": {i: m.cpu() for i, m in self.momentum.items()},
            # A look-ahead may have prepared the next step already (and redrawn V): resume exactly there.
            "V_previous": {i: v.cpu() for i, v in self.V_previous.items()},
            "begun": self._begun,
            "position": self.position,
        }
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise UsageError(
                "the checkpoint holds no zeroth-order state; resume with the trainer that wrote it"
            )
        now = self.settings()
        changed = {k: (v, now[k]) for k, v in zo["settings"].items() if now[k] != v}
        if changed:
            raise UsageError(f"the checkpoint was trained with other settings (checkpoint, now): {changed}")
        super().load_state_dict(state_dict)
        devices = {i: p.device for i, p in self.tensors}
        self.zo_step, self.skipped = zo["step"], zo["skipped"]
        self.V = {int(i): v.to(devices[int(i)]) for i, v in zo["V"].items()}
        self.momentum = {int(i): m.to(devices[int(i)]) for i, m in zo["momentum"].items()}
        # Checkpoints from before look-ahead lack these: they were saved with nothing prepared ahead.
        self.V_previous = {int(i): v.to(devices[int(i)]) for i, v in zo.get("V_previous", {}).items()}
        self._begun, self.position = zo.get("begun"), zo.get("position", 0)


class SaveOnInterruptCallback(TrainerCallback):
    """On SIGUSR1 (as sent by cluster schedulers before preemption): checkpoint after this step and stop."""

    def __init__(self):
        self.interrupted = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGUSR1 received: saving a checkpoint after this step and stopping")
        self.interrupted = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted_anywhere(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def interrupted_anywhere(self, args):
        """Under torchrun the signal may reach some ranks only; all must stop after the same step (else the
        others wait forever in the next all-reduce): one more number per step, with --save_on_interrupt."""
        if args.world_size == 1:
            return self.interrupted
        flag = torch.tensor([float(self.interrupted)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class LowRankTrainer(Trainer):
    """`--trainer regular` trains with the stock HF path; `zo` (MeZO) and `LOZO` (LOZO, LOZO-M) replace the
    training step by two forward passes. All trainers share MeZO's losses (`utils.option_loss`), and
    evaluation during training runs `evaluate_func` (the task metric on the dev samples)."""

    def __init__(self, *args, evaluate_func=None, tokenizer_for_generation=None, **kwargs):
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
        if self.args.save_on_interrupt:
            self.add_callback(SaveOnInterruptCallback())

    @property
    def is_zo(self):
        return self.args.trainer in ("zo", "LOZO")

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
            args = self.args
            lozo = args.trainer == "LOZO"
            self.optimizer_cls_and_kwargs = (
                ZOOptimizer,
                dict(
                    lr=args.learning_rate,
                    eps=args.zo_eps,
                    seed=args.seed,
                    low_rank=lozo,
                    rank=args.rank_r,
                    step_interval=args.step_interval,
                    momentum=args.beta1 if lozo and args.lozo_optimizer == "sgdm" else None,
                    lookahead=True,
                ),
            )
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, ZOOptimizer):
            self.zo_optimizer = optimizer
        return optimizer

    # ---- losses ----

    def loss_sum(self, model, inputs):
        """(summed loss, number of items) of a batch, so that batches can be combined exactly."""
        if "gold" in inputs:
            return self.negative_f1_sum(model, inputs)
        mask = target_mask(
            inputs["input_ids"], inputs["attention_mask"], inputs.get("option_len"), self.pad_token_id
        )
        logits = target_logits(model, inputs, mask)
        return option_loss(logits, inputs, self.pad_token_id, reduction="sum", mask=mask)

    @property
    def pad_token_id(self):
        return self.processing_class.pad_token_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = self.loss_sum(model, inputs)
        loss = total / count
        return (loss, None) if return_outputs else loss

    def negative_f1_sum(self, model, inputs):
        """--non_diff: minus the F1 of greedy answers (SQuAD-style), a loss only ZO methods can use."""
        args, tokenizer = self.args, self.processing_class
        newline = tokenizer.encode(args.eos_token, add_special_tokens=False)[-1]
        # With several GPUs in one process HF wraps the model in DataParallel, which has no generate().
        output = self.accelerator.unwrap_model(model).generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=[newline, tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        scores = [f1(answer.strip(), gold) for answer, gold in zip(answers, inputs["gold"], strict=True)]
        return -torch.tensor(sum(scores), device=inputs["input_ids"].device), len(scores)

    # ---- the zeroth-order step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.is_zo:
            return super().training_step(model, inputs, num_items_in_batch)
        return self.zo_training_step(model, inputs)

    @torch.no_grad()
    def zo_training_step(self, model, inputs):
        """Two forward passes at θ ± εZ. Micro-batches of one optimisation step share Z; their losses are
        summed and g is formed at the last one, which leaves θ − εZ for `optimizer.step()` to restore."""
        model.eval()  # dropout off: both losses must see the same function
        inputs = self._prepare_inputs(inputs)
        optimizer = self.zo_optimizer
        if self._micro_batches == 0:
            optimizer.begin_step()
            self._loss_sums = torch.zeros(3, dtype=torch.float64)
        loss_plus, loss_minus, count = self.two_point_losses(model, inputs)
        self._loss_sums += torch.tensor([float(loss_plus), float(loss_minus), count], dtype=torch.float64)
        self._micro_batches += 1
        if self.accelerator.gradient_state.sync_gradients:
            self._micro_batches = 0
            optimizer.set_projected_grad(self._projected_grad())
        step_loss = float(loss_plus + loss_minus) / (2 * count)
        if math.isfinite(step_loss):
            self._last_finite_loss = step_loss
        elif self._last_finite_loss is not None:
            step_loss = self._last_finite_loss
        return torch.tensor(step_loss / self.current_gradient_accumulation_steps, device=self.args.device)

    def two_point_losses(self, model, inputs):
        """L(θ+εZ) and L(θ−εZ) as (sum, sum, items); the weights stay at θ−εZ. If anything fails in
        between (out of memory, Ctrl-C), θ is restored before the error propagates."""
        optimizer = self.zo_optimizer
        try:
            optimizer.move_to(+1)  # already there when the previous step looked ahead
            loss_plus, count = self.loss_sum(model, inputs)
            optimizer.move_to(-1)
            loss_minus, _ = self.loss_sum(model, inputs)
        except BaseException:
            optimizer.settle()
            self._micro_batches = 0
            raise
        return loss_plus, loss_minus, count

    # The weights sit at θ + εZ of the next step between steps (look-ahead): settle them wherever they are
    # read — evaluation, checkpoints, the end of training (before HF may load the best checkpoint).

    def settle(self):
        if self.zo_optimizer is not None:
            self.zo_optimizer.settle()

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        control = self.control
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self.settle()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        self.settle()
        return super()._save_checkpoint(*args, **kwargs)

    def _finalize_training(self, *args, **kwargs):
        self.settle()  # before HF loads the best checkpoint and callbacks see the end of training
        return super()._finalize_training(*args, **kwargs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # an exception between steps (Ctrl-C) must not leave the model perturbed
            self.settle()
            self._micro_batches = 0

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_zo and self.zo_optimizer.zo_step != self.state.global_step:
            raise UsageError(
                f"checkpoint {checkpoint} has no optimizer state for step {self.state.global_step} "
                "(saved with --save_only_model?); a zeroth-order run resumes only from full checkpoints"
            )

    def _projected_grad(self):
        sums = self.reduce_loss_sums(self._loss_sums)
        loss_plus, loss_minus = (sums[:2] / sums[2]).tolist()
        projected_grad = (loss_plus - loss_minus) / (2 * self.args.zo_eps)
        if not math.isfinite(projected_grad):
            logger.warning(
                "step %d: non-finite loss (L+=%s, L-=%s), update skipped (%d skipped so far)",
                self.state.global_step,
                loss_plus,
                loss_minus,
                self.zo_optimizer.skipped + 1,
            )
        return projected_grad

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
        self.settle()
        if self.evaluate_func is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_func().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
