"""LOZO, LOZO-M and MeZO: zeroth-order training through the hooks of `transformers.Trainer`.

`ZOOptimizer` owns the method: the random directions, the V factors, momentum and the step count. The HF
training loop drives it unchanged: `LowRankTrainer.training_step` measures the two perturbed losses,
`optimizer.step()` applies the update, the lr scheduler moves `lr`, and checkpoints carry
`optimizer.state_dict()`.

Directions, per trainable tensor W at optimisation step t:
  LOZO, 2-D W (m×n):  Z = U Vᵀ, U ~ N(0,1)^{m×r} fresh each step, V ~ N(0,1)^{n×r} redrawn at t = 0, ν, 2ν, …
  otherwise (MeZO, and 1-D tensors under LOZO): dense z ~ N(0,1) of W's shape.
Every tensor has its own random stream seeded from (run seed, step, tensor index), so Z can be regenerated
exactly, in any order and on any device, and is never stored. That is also what makes data-parallel ZO
cheap: replicas started by torchrun draw the same Z, so they need to sum only their loss sums and counts
(`LowRankTrainer.reduce_loss_sums`) to take the same step.

Exact arithmetic in any dtype. Writing θ ± εZ into the weights and back rounds every time, and in half
precision the roundings random-walk (bf16 weights drifted by 4 % in 300 steps at learning rate 0), while
the papers' updates (lr 1e-6 – 1e-7) are far below a half-precision weight's last bit. So no weight is
ever perturbed in place:
  * a LOZO matrix keeps its weights W as they are and the modules that read W add its low-rank part to
    their output (`SidePath`): the model computes with scale·W + [A + position·εU | A_old]·[V | V_old]ᵀ,
    where A = −η Σ g U is this V period's update so far and A_old, V_old the finished periods, all float32
    (`LowRankMatrix`). Every `merge_periods` periods, and before a checkpoint, they are written into W,
    rounded once — stochastically in half precision, so the merge is unbiased;
  * every other tensor has a float32 master copy: the weights are written as round(master + position·εz)
    and the update goes into the master. That is small for LOZO's vectors; for MeZO it is 4 bytes a weight,
    and `in_place` keeps MeZO's original in-place arithmetic (inference memory, rounding drift) instead.
"""

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from metrics import f1
from utils import UsageError, model_option_loss, replace_folder

logger = logging.getLogger(__name__)

U_STREAM, V_STREAM, ROUNDING_STREAM = 0, 1, 2
CHUNK = 1 << 20  # elements per chunk of dense noise and of a merge: no parameter-sized temporary


def stream_seed(*key):
    """A 63-bit seed that depends on every part of `key` (NumPy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(seed, device):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def gaussian(shape, seed, device):
    return torch.randn(shape, generator=seeded_generator(seed, device), device=device, dtype=torch.float32)


def dense_noise(numel, seed, device):
    """Yield (start, z) chunk by chunk: z ~ N(0,1) in float32 for elements start … start + len(z) of a flat
    tensor. z is refilled by the next chunk: use it before asking for the next one. (One buffer refilled in
    place gives the same numbers as torch.randn; drawing bounds a dense step, and a fresh allocation per
    chunk costs ~15 % more on a CPU.)"""
    generator = seeded_generator(seed, device)
    buffer = torch.empty(min(CHUNK, numel), device=device, dtype=torch.float32)
    for start in range(0, numel, CHUNK):
        yield start, buffer[: min(CHUNK, numel - start)].normal_(generator=generator)


def stochastic_round(values, dtype, generator):
    """float32 `values` in a narrower `dtype`, each rounded to one of its two neighbours at random, with the
    probability that makes the expected result the value itself. (Rounding to nearest would drop every
    change smaller than half a unit in the last place: most of a merged update at lr 1e-6 in bf16.)"""
    if values.dtype == dtype:
        return values
    nearest = values.to(dtype)
    error = values - nearest.float()
    neighbour = torch.nextafter(nearest, torch.where(error > 0, torch.inf, -torch.inf).to(dtype))
    gap = (neighbour.float() - nearest.float()).abs()
    away = torch.rand(values.shape, generator=generator, device=values.device) * gap < error.abs()
    return torch.where(away, neighbour, nearest)


def hash_into(hasher, tensor):
    """Feed a tensor's bytes to `hasher`, CHUNK elements at a time (no tensor-sized copy off a GPU)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        hasher.update(flat[start : start + CHUNK].cpu().view(torch.uint8).numpy())


def add_product_(output, left, right):
    """output += left @ right over the last dimension (output (..., b), left (..., k), right (k, b)), fused
    into one addmm_ when the dtypes agree."""
    if output.dtype == left.dtype:
        return (
            output.view(-1, output.shape[-1]).addmm_(left.view(-1, left.shape[-1]), right).view(output.shape)
        )
    return output.add_(left @ right)


class LowRankMatrix:
    """A LOZO matrix W (m×n) and its factors. The model computes with the effective weight

        scale · (W + [C + position·(ε/scale)·U | A_old] · [V | V_old]ᵀ)

    W, the parameter, is written only by `merge`. C (m×r, float32) is this V period's update so far and
    A_old, V_old the finished periods not merged yet (`periods` of them); `scale` is the weight decay since
    the last merge, kept as one number so that decay never rounds a factor.

    The factors live transposed in two buffers of the compute dtype, `left` ((1 + capacity)·r × m) and
    `right` ((1 + capacity)·r × n): rows 0…r−1 hold this period, the next rows A_old and V_old, and the
    forward multiplies by their first r + `used` rows. C accumulates in float32 and is rounded to the
    compute dtype once per move; the merge writes exactly what the forward computed with."""

    def __init__(self, param, rank, eps, capacity):
        m, n = param.shape
        self.param, self.rank, self.eps = param, rank, eps
        # float16's range is too small for x·V on large activations; bfloat16 and float32 compute as they are.
        self.compute_dtype = torch.float32 if param.dtype == torch.float16 else param.dtype
        rows = (1 + capacity) * rank
        self.left = torch.zeros(rows, m, dtype=self.compute_dtype, device=param.device)
        self.right = torch.zeros(rows, n, dtype=self.compute_dtype, device=param.device)
        self.exact_dtype = torch.promote_types(param.dtype, torch.float32)  # of C, U and the merge
        self.C = torch.zeros(m, rank, dtype=self.exact_dtype, device=param.device)
        self.U = torch.zeros_like(self.C)
        self.used, self.scale, self.position = 0, 1.0, 0
        self.active = False  # whether the low-rank part is non-zero (else the forward skips it)

    @property
    def V(self):
        return self.right[: self.rank].T.to(self.exact_dtype, copy=True)

    @property
    def periods(self):
        return self.used // self.rank

    def current(self):
        """This period's rows of the left factor, in float32: C + position·(ε/scale)·U."""
        if self.position == 0:
            return self.C
        return self.C + (self.position * self.eps / self.scale) * self.U

    def begin_period(self, V):
        """A new V: this period's update joins the unmerged ones (unless it is zero, as at lr 0)."""
        r = self.rank
        if self.C.any():
            self.left[r + self.used : 2 * r + self.used] = self.C.T
            self.right[r + self.used : 2 * r + self.used] = self.right[:r]
            self.used += r
        self.C.zero_()
        self.right[:r] = V.T
        self.move_to(self.position)

    def move_to(self, position):
        self.position = position
        self.left[: self.rank] = self.current().T
        self.active = position != 0 or self.used > 0 or bool(self.C.any()) or self.scale != 1.0

    def update(self, direction, lr, decay):
        """Effective weight ← decay · effective weight − lr · direction · Vᵀ, back at position 0."""
        self.scale *= decay
        self.C.add_(direction, alpha=-lr / self.scale)
        self.move_to(0)

    def merge(self, generator, current):
        """W ← scale·(W + A_old·V_oldᵀ (+ C·Vᵀ with `current`)), rounded once, row block by row block. The
        merged factors restart from zero."""
        first = 0 if current else self.rank
        A = self.left[first : self.rank + self.used].T.to(self.exact_dtype)
        V = self.right[first : self.rank + self.used].to(self.exact_dtype)
        if self.scale != 1.0 or A.any():
            W = self.param.data
            rows = max(1, CHUNK // W.shape[1])
            for start in range(0, W.shape[0], rows):
                block = W[start : start + rows]
                exact = torch.addmm(block.to(self.exact_dtype), A[start : start + rows], V).mul_(self.scale)
                block.copy_(stochastic_round(exact, W.dtype, generator))
        if current:
            self.C.zero_()
        else:
            self.C.mul_(self.scale)  # this period's update, now relative to the merged W
        self.used, self.scale = 0, 1.0
        self.move_to(self.position)

    def add_to(self, func, inputs, output, bias):
        """The output of F.linear / F.embedding with W, turned into the output with the effective weight."""
        if not self.active:
            return output
        k = self.rank + self.used
        left, right = self.left[:k], self.right[:k]
        if func is F.linear:  # x·Wᵀ  →  x·Wᵀ + (x·V)·Lᵀ
            add_product_(output, inputs.to(self.compute_dtype) @ right.T, left)
        else:  # W[i]  →  W[i] + L[i]·Vᵀ
            add_product_(output, F.embedding(inputs, left.T), right)
        if self.scale != 1.0:  # scale·(W x + side) + bias
            output.mul_(self.scale)
            if bias is not None:
                output.add_(bias, alpha=1.0 - self.scale)
        return output

    def effective(self):
        """The effective weight, as the forward computes with it, in float32 (for tests and benchmarks: it is
        parameter-sized)."""
        k = self.rank + self.used
        A, V = self.left[:k].T.to(self.exact_dtype), self.right[:k].to(self.exact_dtype)
        return torch.addmm(self.param.detach().to(self.exact_dtype), A, V).mul_(self.scale)

    def state(self):
        k = self.rank + self.used
        return {
            "left": self.left[:k].cpu(),
            "right": self.right[:k].cpu(),
            "C": self.C.cpu(),
            "scale": self.scale,
        }

    def load(self, state):
        k = len(state["left"])
        self.left[:k], self.right[:k] = state["left"], state["right"]
        self.used, self.C, self.scale = k - self.rank, state["C"].to(self.param.device), state["scale"]
        self.move_to(self.position)


# Reads of a matrix that involve no values (the modules that own one may ask for its dtype or shape).
METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.data_ptr,
    torch.Tensor.stride,
}
METADATA_PROPERTIES = {
    torch.Tensor.shape,
    torch.Tensor.dtype,
    torch.Tensor.device,
    torch.Tensor.ndim,
    torch.Tensor.requires_grad,
    torch.Tensor.is_cuda,
}


class SidePath(TorchFunctionMode):
    """Active during the forward of a module that owns LOZO matrices (its hooks enter and leave it): every
    F.linear / F.embedding that reads one of them gets the matrix's low-rank part added to its output. Any
    other read of such a matrix would see W without it, so it is refused."""

    def __init__(self, module, matrices, names):
        super().__init__()
        self.module, self.matrices, self.names = module, matrices, names

    def enter(self, module, args):
        self.__enter__()

    def leave(self, module, args, output):
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            matrix = self.matrices.get(id(weight))
            if matrix is not None:
                if func is F.linear:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                else:
                    bias = None
                    if (args[3] if len(args) > 3 else kwargs.get("max_norm")) is not None:
                        self.refuse(weight, "F.embedding with max_norm (it rewrites the rows it reads)")
                return matrix.add_to(func, args[0], func(*args, **kwargs), bias)
        elif func not in METADATA and getattr(func, "__self__", None) not in METADATA_PROPERTIES:
            for value in itertools.chain(args, kwargs.values()):
                if id(value) in self.matrices:
                    self.refuse(value, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def refuse(self, weight, reader):
        name = self.names.get(id(weight), f"a {tuple(weight.shape)} matrix")
        raise UsageError(
            f"--trainer LOZO cannot train {name}: {type(self.module).__name__} reads it with {reader}, "
            "and LOZO adds its low-rank perturbation to linear and embedding reads only; freeze it or use "
            "--trainer zo"
        )


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD along random directions (MeZO), low-rank directions (LOZO) and LOZO's momentum.

    Protocol for one optimisation step (what `LowRankTrainer.training_step` does):
        begin_step(); move_to(+1); L+ = loss; move_to(-1); L- = loss; set_projected_grad((L+ - L-) / 2ε)
        step()  # the update; the model is back at θ (position 0)
    LOZO matrices reach the model through `attach(model)`; `settle()` writes everything into the parameters
    (before checkpoints), `release()` also detaches (the end of training).
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
        in_place=False,
        merge_periods=8,
        names=None,
        replayable=False,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.seed, self.low_rank, self.in_place = eps, seed, low_rank, in_place
        self.rank, self.step_interval, self.beta = rank, step_interval, momentum
        self.merge_periods = merge_periods
        self.replayable = replayable  # hash the starting weights (a full pass over them), so `record` works
        self.tensors = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])]
        self.index = {id(p): i for i, p in self.tensors}
        self.names = names or {}
        self.zo_step = 0  # optimisation steps taken: selects Z and the V period
        self.skipped = 0  # steps whose losses were not finite
        self.projected_grad = None
        self.position = 0  # the model computes with θ + position·εZ of the current step
        self.momentum = {}  # tensor index -> N (m×r) for LOZO matrices, dense momentum otherwise (float32)
        self.matrices = {
            i: LowRankMatrix(p, rank, eps, merge_periods)
            for i, p in self.tensors
            if low_rank and p.dim() == 2
        }
        self.masters = {}  # tensor index -> float32 master copy: all but the matrices, unless in_place
        # Everything that retakes this run from its starting weights without a forward pass (`replay`): a
        # hash of those weights, every step's g and learning rates, and the steps at which settle() rounded.
        self.trajectory = {"start": None, "steps": [], "settled_at": []}
        self.model, self.hooks = None, []
        self._acquire()

    def _acquire(self):
        self.released = False
        if not self.in_place:
            self.masters = {
                i: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                for i, p in self.tensors
                if i not in self.matrices
            }
        if self.model is not None and not self.hooks:
            self.attach(self.model)

    def settings(self):
        """What a checkpoint must agree on to resume this run."""
        return {
            "low_rank": self.low_rank,
            "rank": self.rank,
            "step_interval": self.step_interval,
            "momentum": self.beta,
            "eps": self.eps,
            "seed": self.seed,
            "in_place": self.in_place,
            "merge_periods": self.merge_periods,
        }

    def attach(self, model):
        """Hook every module of `model` that owns LOZO matrices: its forward adds their low-rank part."""
        self.model = model
        if self.hooks or not self.matrices:
            return
        by_id = {id(matrix.param): matrix for matrix in self.matrices.values()}
        for module in model.modules():
            own = {id(p): by_id[id(p)] for p in module.parameters(recurse=False) if id(p) in by_id}
            if own:
                side_path = SidePath(module, own, self.names)
                self.hooks.append(module.register_forward_pre_hook(side_path.enter))
                self.hooks.append(module.register_forward_hook(side_path.leave, always_call=True))

    def _seed(self, i, step=None):
        """Seed of tensor i's U or dense z at `step` (default: the current step)."""
        return stream_seed(self.seed, U_STREAM, self.zo_step if step is None else step, i)

    def _rounding(self, i):
        return seeded_generator(
            stream_seed(self.seed, ROUNDING_STREAM, self.zo_step, i), self.tensors[i][1].device
        )

    def begin_step(self):
        """This step's directions: U of every matrix, and at steps 0, ν, 2ν, … a new V."""
        if self.released:
            self._acquire()
        if self.replayable and self.zo_step == 0 and self.trajectory["start"] is None:
            self.trajectory["start"] = self.fingerprint()
        if self.zo_step % self.step_interval == 0:
            period = self.zo_step // self.step_interval
            for i, matrix in self.matrices.items():
                n = matrix.param.shape[1]
                V = gaussian((n, self.rank), stream_seed(self.seed, V_STREAM, period, i), matrix.param.device)
                previous = matrix.V
                matrix.begin_period(V)
                if i in self.momentum:  # LOZO-M: the momentum carried into the new V's basis
                    self.momentum[i] = self.momentum[i] @ (previous.T @ matrix.V) / n
                if matrix.periods >= self.merge_periods:
                    matrix.merge(self._rounding(i), current=False)
        for i, matrix in self.matrices.items():
            U = gaussian((matrix.param.shape[0], self.rank), self._seed(i), matrix.param.device)
            matrix.U = U.to(matrix.exact_dtype)

    @torch.no_grad()
    def move_to(self, position):
        """Make the model compute with θ + position·εZ of this step."""
        if position == self.position:
            return
        if self.position is None and self.in_place:  # a step failed half-way through the weights
            logger.warning("a zeroth-order step was interrupted mid-update: the weights are not restorable")
        delta = None if self.position is None else position - self.position
        for i, p in self.tensors:
            if i in self.matrices:
                self.matrices[i].move_to(position)
            elif i in self.masters:
                self._write_from_master(i, p, position)
            elif delta:  # MeZO in place: every move rounds
                for start, z in dense_noise(p.numel(), self._seed(i), p.device):
                    p.data.view(-1)[start : start + len(z)].add_(z, alpha=delta * self.eps)
        self.position = position

    def _write_from_master(self, i, p, position):
        """p ← master + position·εz, rounded to p's dtype once."""
        master, flat = self.masters[i].view(-1), p.data.view(-1)
        if position == 0:
            flat.copy_(master)
            return
        for start, z in dense_noise(p.numel(), self._seed(i), p.device):
            end = start + len(z)
            flat[start:end].copy_(torch.add(master[start:end], z, alpha=position * self.eps))

    def set_projected_grad(self, projected_grad):
        self.projected_grad = projected_grad

    @torch.no_grad()
    def step(self, closure=None):
        """W ← W − η(g·Z + λW) (LOZO-M: W − η(N·Vᵀ + λW)) for every tensor; the model ends at θ."""
        g = self.projected_grad
        if g is None:
            raise RuntimeError("ZOOptimizer.step() needs set_projected_grad() first")
        self.trajectory["steps"].append([g, [group["lr"] for group in self.param_groups]])
        finite = math.isfinite(g)
        if not finite:
            self.skipped += 1
            g = 0.0
        restore, self.position = -self.position, None  # None until every tensor is updated (see move_to)
        # The groups are read now: the lr scheduler (and load_state_dict) replace their values.
        for group in self.param_groups:
            lr, decay = (group["lr"], 1.0 - group["lr"] * group["weight_decay"]) if finite else (0.0, 1.0)
            for p in group["params"]:
                i = self.index[id(p)]
                if i in self.matrices:
                    matrix = self.matrices[i]
                    matrix.update(self._low_rank_direction(i, g * matrix.U, finite), lr, decay)
                else:
                    self._step_dense(i, p, g, lr, decay, restore, finite)
        self.zo_step += 1
        self.projected_grad = None
        self.position = 0

    def _low_rank_direction(self, i, gU, finite):
        """g·U, or for LOZO-M the momentum N ← βN + (1−β)·g·U, started at N₀ = g₀U₀ as the released code
        starts it (not from zero, which would make the first steps (1−β) times smaller)."""
        if self.beta is None:
            return gU
        N = self.momentum.get(i)
        if finite:
            N = gU if N is None else self.beta * N + (1 - self.beta) * gU
            self.momentum[i] = N
        return torch.zeros_like(gU) if N is None else N

    def _step_dense(self, i, p, g, lr, decay, restore, finite):
        """One pass: from θ + (−restore)·εz (in place) or from the master, W ← decay·W − η(g·z or m)."""
        first = self.beta is not None and i not in self.momentum and finite
        if first:  # m₀ = g₀z₀, as N₀ = g₀U₀
            self.momentum[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        momentum = self.momentum.get(i)  # only LOZO-M / MeZO with momentum keep any
        master = self.masters.get(i)
        weights = (p.data if master is None else master).view(-1)
        back = decay * restore * self.eps if master is None else 0.0  # in place: undo the perturbation too
        for start, z in dense_noise(p.numel(), self._seed(i, self.zo_step), p.device):
            w = weights[start : start + len(z)]
            if decay != 1.0:
                w.mul_(decay)
            if momentum is None:
                w.add_(z, alpha=back - lr * g)
            else:
                m = momentum.view(-1)[start : start + len(z)]
                if finite:
                    m.mul_(self.beta).add_(z, alpha=g if first else (1 - self.beta) * g)
                if back:
                    w.add_(z, alpha=back)
                w.add_(m, alpha=-lr)
            if master is not None:
                p.data.view(-1)[start : start + len(z)].copy_(w)

    @torch.no_grad()
    def settle(self):
        """Make the parameters themselves hold θ, as a checkpoint needs: position 0, and every matrix's
        low-rank factors merged into its weights."""
        if self.released:
            return
        self.move_to(0)
        settled = self.trajectory["settled_at"]
        if self.matrices and (not settled or settled[-1] != self.zo_step):  # a merge rounds: replay it too
            settled.append(self.zo_step)
        for i, matrix in self.matrices.items():
            matrix.merge(self._rounding(i), current=True)

    def release(self):
        """settle(), then leave the model alone (the end of training; HF may load the best checkpoint next).
        begin_step() takes the parameters up again."""
        self.settle()
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.masters, self.released = [], {}, True

    def effective_weight(self, p):
        """θ + position·εZ of tensor p in float32, as the model computes with it (tests and benchmarks)."""
        i = self.index[id(p)]
        if i in self.matrices:
            return self.matrices[i].effective()
        weight = self.masters[i] if i in self.masters else p.detach()
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
        if i in self.masters and self.position:
            z = torch.cat([z.clone() for _, z in dense_noise(p.numel(), self._seed(i), p.device)])
            weight.add_(z.view(p.shape), alpha=self.position * self.eps)
        return weight

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {
            "settings": self.settings(),
            "step": self.zo_step,
            "skipped": self.skipped,
            "matrices": {i: matrix.state() for i, matrix in self.matrices.items()},
            "momentum": {i: m.cpu() for i, m in self.momentum.items()},
            # A float32 master holds bits its half-precision weights do not: resuming exactly needs them.
            "masters": {
                i: m.cpu() for i, m in self.masters.items() if self.tensors[i][1].dtype != torch.float32
            },
            "position": self.position,
            "trajectory": self.trajectory,
        }
        return state

    def refuse_other_settings(self, saved, weight_decay=None):
        """A resume continues the same run: settings that differ from the checkpoint's are an error naming
        them. (A loaded optimizer state brings its own weight decay; a replay checks the recorded one.)"""
        now = self.settings()
        changed = {k: (v, now[k]) for k, v in saved.items() if now[k] != v}
        decay_now = [group["weight_decay"] for group in self.param_groups]
        if weight_decay is not None and weight_decay != decay_now:
            changed["weight_decay"] = (weight_decay, decay_now)
        if changed:
            raise UsageError(f"the checkpoint was trained with other settings (checkpoint, now): {changed}")

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise UsageError(
                "the checkpoint holds no zeroth-order state; resume with the trainer that wrote it"
            )
        self.refuse_other_settings(zo["settings"])
        super().load_state_dict(state_dict)
        device = {i: p.device for i, p in self.tensors}
        self.zo_step, self.skipped = zo["step"], zo["skipped"]
        # A checkpoint from before steps were recorded has none: `record` then finds steps missing.
        self.trajectory = zo.get("trajectory", {"start": None, "steps": [], "settled_at": []})
        self.momentum = {int(i): m.to(device[int(i)]) for i, m in zo["momentum"].items()}
        for i, master in zo.get("masters", {}).items():
            self.masters[int(i)].copy_(master)
        if "matrices" in zo:
            for i, matrix_state in zo["matrices"].items():
                self.matrices[int(i)].load(matrix_state)
        else:  # written before the low-rank side path: weights at θ, V of the period (the one a look-ahead
            # may have replaced already is V_previous), nothing unmerged
            for i, V in zo["V"].items():
                self.matrices[int(i)].right[: self.rank] = zo.get("V_previous", {}).get(i, V).T
        self.move_to(zo.get("position", 0))

    # ---- the run as a record of its steps (--zo_trajectory_checkpoints) ----

    def fingerprint(self):
        """SHA-256 of the weights (every parameter of the attached model, else the optimised tensors), read
        chunk by chunk: a replay must begin from the weights the run began from."""
        hasher = hashlib.sha256()
        params = self.model.parameters() if self.model is not None else (p for _, p in self.tensors)
        for p in params:
            hash_into(hasher, p)
        return hasher.hexdigest()

    def record(self):
        """This run so far as JSON-ready steps: what `replay` needs, a few bytes a step."""
        steps = self.trajectory["steps"]
        if len(steps) != self.zo_step or self.trajectory["start"] is None:
            raise UsageError(
                "this run's steps since its start are not all recorded (it began without "
                "--zo_trajectory_checkpoints); continue it with full checkpoints"
            )
        return {
            "settings": self.settings(),
            "weight_decay": [group["weight_decay"] for group in self.param_groups],
            **self.drawn_by(),
            **self.trajectory,
            "digest": self.state_digest(),  # where the steps lead: a replay checks it arrived
        }

    def drawn_by(self):
        """What the directions depend on besides the settings: the generator (its device type and torch's
        algorithms: a CUDA generator draws other numbers than a CPU one for the same seed) and which
        tensors are trained, in which order."""
        tensors = [[self.names.get(id(p), str(i)), list(p.shape)] for i, p in self.tensors]
        return {
            "device": self.tensors[0][1].device.type,
            "torch": torch.__version__,
            "tensors": hashlib.sha256(json.dumps(tensors).encode()).hexdigest(),
        }

    def state_digest(self):
        """SHA-256 of the small state every step changes: each LOZO matrix's factors, scale and momentum, and
        every tensor of at most CHUNK elements (its master, if any). A replay that took other steps ends
        with another digest."""
        hasher = hashlib.sha256()
        for i, p in self.tensors:
            if i in self.matrices:
                matrix = self.matrices[i]
                k = matrix.rank + matrix.used
                parts = [matrix.left[:k], matrix.right[:k], matrix.C, torch.tensor([matrix.scale])]
                parts += [self.momentum[i]] if i in self.momentum else []
            else:
                parts = [self.masters.get(i, p.detach())] if p.numel() <= CHUNK else []
            for part in parts:
                hash_into(hasher, part)
        return hasher.hexdigest()

    @torch.no_grad()
    def replay(self, record, log_every=100):
        """Retake the recorded steps from the starting weights: the same seeds, g and learning rates make the
        same updates and roundings, so the weights come out bit for bit as the run left them (on the same
        kind of machine), at the cost of the updates alone: no forward pass."""
        if self.zo_step != 0:
            raise RuntimeError("replay() retakes a run from its first step: use a new optimizer")
        self.refuse_other_settings(record["settings"], record["weight_decay"])
        here = self.drawn_by()
        changed = {k: (record[k], v) for k, v in here.items() if record[k] != v}
        if changed:
            raise UsageError(
                f"the checkpoint's directions were drawn elsewhere (checkpoint, here): {changed}; replay it "
                "on the device type and torch version it was written with, training the same tensors"
            )
        if self.fingerprint() != record["start"]:
            raise UsageError(
                "the checkpoint's steps start from other weights than this model's; resume with the model, "
                "dtype (--load_bfloat16 / --load_float16) and mode (--lora, --prefix_tuning, --untie_emb, "
                "--load_adapter) the run started with"
            )
        self.trajectory["start"] = record["start"]
        settled = set(record["settled_at"])
        for g, lrs in record["steps"]:
            if self.zo_step in settled:
                self.settle()
            self.begin_step()
            if self.in_place:  # MeZO's in-place arithmetic rounds at every move: make the moves again
                self.move_to(+1)
                self.move_to(-1)
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr
            self.set_projected_grad(g)
            self.step()
            if self.zo_step % log_every == 0:
                logger.info("replayed %d of %d steps", self.zo_step, len(record["steps"]))
        if self.zo_step in settled:
            self.settle()
        if self.state_digest() != record["digest"]:  # e.g. another CPU's vectorised draws or matrix products
            logger.warning(
                "the replayed state differs from the checkpoint's in its last bits (another kind of CPU?): "
                "the run goes on from the same steps, not bit for bit"
            )


class SaveOnInterruptCallback(TrainerCallback):
    """On SIGTERM or SIGUSR1 (what schedulers send before they kill or preempt a job): checkpoint after the
    step in progress and stop. The handlers are installed for the training loop only."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.interrupted = False
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        logger.warning(
            "%s received: saving a checkpoint after this step and stopping", signal.Signals(signum).name
        )
        self.interrupted = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted_anywhere(args):
            self.interrupted = True
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


# ---- checkpoints that are complete or absent ----

STAGING_DIR = ".incomplete"  # <output_dir>/.incomplete/checkpoint-N: a checkpoint being written
TRAJECTORY_NAME = "zo_trajectory.json"  # a zeroth-order run's steps, in place of weights and optimizer


def holds_steps(checkpoint):
    """Whether a checkpoint folder records steps (--zo_trajectory_checkpoints) instead of weights."""
    return os.path.isfile(os.path.join(checkpoint, TRAJECTORY_NAME))


MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
)


def checkpoint_problem(folder, with_optimizer=True):
    """Why `folder` cannot be resumed from, naming the first missing or unreadable file; None if it can.
    Checked without loading anything large: file headers only."""
    if not os.path.isdir(folder):
        return "no such folder"
    present = set(os.listdir(folder))
    rng = sorted(name for name in present if name.startswith("rng_state"))
    model_file = next((name for name in MODEL_FILES if name in present), None)
    if TRAJECTORY_NAME in present:  # no weights: they are rebuilt from the steps
        required = [TRAJECTORY_NAME, "trainer_state.json", SCHEDULER_NAME, *rng[:1]]
    elif model_file is None and not any(name.startswith("pytorch_model_fsdp") for name in present):
        return f"no model weights ({MODEL_FILES[0]})"
    else:
        required = [
            "trainer_state.json",
            *(["optimizer.pt", SCHEDULER_NAME] if with_optimizer else []),
            *rng[:1],
        ]
    for name in [*required, *([model_file] if model_file else [])]:
        path = os.path.join(folder, name)
        if name not in present or os.path.getsize(path) == 0:
            return f"{name} is missing"
        if not readable(path):
            return f"{name} is damaged"
    if not rng:
        return "rng_state.pth is missing"
    return None


def readable(path):
    """A cheap integrity check: the JSON parses, a torch file's zip directory (written last) is there, a
    safetensors header parses."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif path.endswith((".pt", ".pth", ".bin")):
            return zipfile.is_zipfile(path)
        elif path.endswith(".safetensors"):
            with safe_open(path, framework="pt"):
                pass
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def last_complete_checkpoint(output_dir, with_optimizer=True):
    """The newest checkpoint-N in output_dir that can be resumed from; damaged ones are skipped with a
    warning. None when there is none."""
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit():
            steps.append((int(name.split("-")[-1]), os.path.join(output_dir, name)))
    for _, folder in sorted(steps, reverse=True):
        problem = checkpoint_problem(folder, with_optimizer)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


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
        self.interrupt = SaveOnInterruptCallback() if self.args.save_on_interrupt else None
        if self.interrupt is not None:
            self.add_callback(self.interrupt)
        self._staging = False

    @property
    def is_zo(self):
        return self.args.trainer in ("zo", "LOZO")

    @property
    def saves_trajectories(self):
        """--zo_trajectory_checkpoints: a checkpoint holds the steps taken, not the weights they made."""
        return self.is_zo and getattr(self.args, "zo_trajectory_checkpoints", False)

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
                    in_place=args.zo_in_place,
                    merge_periods=args.merge_periods,
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

    def loss_sum(self, model, inputs):
        """(summed loss, number of items) of a batch, so that batches can be combined exactly."""
        if "gold" in inputs:
            return self.negative_f1_sum(model, inputs)
        pack = getattr(self.args, "padding_free", True)
        return model_option_loss(model, inputs, self.pad_token_id, reduction="sum", pack=pack)

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
        if isinstance(model, torch.nn.DataParallel) and optimizer.matrices:
            raise UsageError(
                "LOZO's hooks do not follow DataParallel's model copies (several GPUs in one process); "
                "run one process per GPU with torchrun (NUM_GPU=N), or drop --no_auto_device"
            )
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
        """L(θ+εZ) and L(θ−εZ) as (sum, sum, items); the model stays at θ−εZ. If anything fails in
        between (out of memory, Ctrl-C), it is put back at θ before the error propagates."""
        optimizer = self.zo_optimizer
        try:
            optimizer.move_to(+1)
            loss_plus, count = self.loss_sum(model, inputs)
            optimizer.move_to(-1)
            loss_minus, _ = self.loss_sum(model, inputs)
        except BaseException:
            optimizer.move_to(0)
            self._micro_batches = 0
            raise
        return loss_plus, loss_minus, count

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
        # The model computes with θ here (the hooks add the low-rank factors); nothing is merged, so how
        # often a run evaluates does not change its trajectory.
        if self.evaluate_func is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_func().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
