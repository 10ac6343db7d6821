"""`ZOOptimizer`: zeroth-order SGD along MeZO's dense random directions, LOZO's low-rank ones and LOZO's
momentum, with the run as a record of its steps (`record` / `replay`).

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
  * every other tensor (LOZO's vectors) has a float32 master copy: the weights are written as
    round(master + position·εz) and the update goes into the master;
  * MeZO's tensors are perturbed module by module (`DensePath`): a module computes with round(W ± εz)
    built for its own forward, and the update alone writes W, rounded stochastically in half precision.
    `master_weights` keeps a float32 master instead (+4 bytes a weight), `in_place` MeZO's original
    in-place arithmetic (rounding drift).
"""

import functools
import hashlib
import json
import logging
import math

import numpy as np
import torch

from dense_path import DensePath
from side_path import (
    CHUNK,
    PAIR,
    LowRankMatrix,
    PairBatch,
    SidePath,
    as_rows,
    float_copies,
    move_all,
    round_all_into,
    update_all,
)
from utils import UsageError

logger = logging.getLogger(__name__)

U_STREAM, V_STREAM, ROUNDING_STREAM = 0, 1, 2
SMALL = 1 << 16  # a tensor of at most this many numbers (norms, biases) keeps its z for the step


@functools.lru_cache(maxsize=1 << 13)  # a step asks for a dense tensor's seed at each move and its update
def stream_seed(*key):
    """A 63-bit seed that depends on every part of `key` (NumPy's SeedSequence mixes them well; 12 µs)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(seed, device):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def gaussian(shape, seed, device):
    return torch.randn(shape, generator=seeded_generator(seed, device), device=device, dtype=torch.float32)


def noise_chunk(numel, device):
    """Elements per chunk of a dense tensor's noise and update, for `numel` trained numbers on `device`: the
    float32 temporaries of a chunk take about 14 bytes an element (z, and the update's copy and random bits).
    A CPU streams them best through its caches at CHUNK (2²⁰: 2²³ measured 6 % slower for SmolLM2's MeZO
    step). A GPU launches ~13 kernels a chunk and a step, at a few µs of Python and launch each; at 2²⁰
    each kernel takes about as long (a few MB at TB/s), so launches would bound a large model's step (OPT-13B:
    12.7K chunks a pass). There a chunk is 1/512 of the trained numbers (temporaries under 3 % of fp16
    weights), a power of two from 2²⁰ to 2²⁴: 10× fewer chunks at OPT-13B. A CPU draws the same numbers in
    any chunks of a multiple of 16; a GPU's draws depend on the chunks, so a replay checks them
    (`drawn_by`)."""
    if torch.device(device).type == "cpu":
        return CHUNK
    return 1 << min(24, max(20, (numel // 512).bit_length() - 1))


def dense_noise(numel, seed, device, chunk=CHUNK):
    """Yield (start, z) chunk by chunk: z ~ N(0,1) in float32 for elements start … start + len(z) of a flat
    tensor. z is refilled by the next chunk: use it before asking for the next one. (One buffer refilled in
    place gives the same numbers as torch.randn on a CPU; drawing bounds a dense step, and a fresh allocation
    per chunk costs ~15 % more on a CPU.)"""
    generator = seeded_generator(seed, device)
    buffer = torch.empty(min(chunk, numel), device=device, dtype=torch.float32)
    for start in range(0, numel, chunk):
        yield start, buffer[: min(chunk, numel - start)].normal_(generator=generator)


def as_tuple(key):
    """A matrix key (a tensor index, or (index, expert)) as the tuple that seeds its streams."""
    return key if isinstance(key, tuple) else (key,)


def as_key(key):
    """A matrix or momentum key as loaded from a checkpoint (ints may come back as strings)."""
    return tuple(int(k) for k in key) if isinstance(key, (tuple, list)) else int(key)


def expert_of(key):
    return key[1] if isinstance(key, tuple) else None


def hash_into(hasher, tensor):
    """Feed a tensor's bytes to `hasher`, CHUNK elements at a time (no tensor-sized copy off a GPU)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        hasher.update(flat[start : start + CHUNK].cpu().view(torch.uint8).numpy())


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD along random directions (MeZO), low-rank directions (LOZO) and LOZO's momentum.

    Protocol for one optimisation step (what `LowRankTrainer.training_step` does):
        begin_step(); move_to(+1); L+ = loss; move_to(-1); L- = loss; set_projected_grad((L+ - L-) / 2ε)
        step()  # the update; the model is back at θ (position 0)
    With `queries` q, set_projected_grad takes the list of the q values of g, and the losses of direction k
    (k = 1 … q − 1) follow begin_query(k). With `batched_pair`, move_to(PAIR) and one forward of the batch
    2q times give L+ and L− of every direction: its parts, in the order of evaluations(PAIR).
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
        master_weights=False,
        batched_pair=False,
        queries=1,
        compensated=False,
    ):
        if queries < 1:
            raise UsageError(f"--zo_queries {queries}: a step needs at least one direction; use 1 or more")
        if in_place and (batched_pair or queries > 1):
            raise UsageError(
                "--zo_in_place holds one perturbation in the weights at a time: it takes neither "
                "--zo_batched_pair nor --zo_queries above 1; drop --zo_in_place"
            )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.seed, self.low_rank, self.in_place = eps, seed, low_rank, in_place
        # Dense tensors (MeZO's; LOZO's biases and norms): a float32 master copy (LOZO always, MeZO with
        # master_weights), written in place (in_place), or else perturbed module by module (`DensePath`).
        self.master_weights = master_weights or (low_rank and not in_place)
        self.rank, self.step_interval, self.beta = rank, step_interval, momentum
        self.merge_periods = merge_periods
        self.queries = queries  # directions a step (--zo_queries): the update averages their g·Z
        self.query = 0  # the direction being evaluated
        # --zo_batched_pair: θ±εZ_k of every direction k evaluated as one forward of the batch 2q times (PAIR)
        self.pair = PairBatch(queries) if batched_pair else None
        self.replayable = replayable  # hash the starting weights (a full pass over them), so `record` works
        self.tensors = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])]
        self.index = {id(p): i for i, p in self.tensors}
        self.names = names or {}
        trained = sum(p.numel() for _, p in self.tensors)
        self.chunk = noise_chunk(trained, self.tensors[0][1].device) if self.tensors else CHUNK
        self.small_z = {}  # seed -> z of a tensor of at most SMALL numbers, this step
        self.zo_step = 0  # optimisation steps taken: selects Z and the V period
        self.skipped = 0  # steps whose losses were not finite
        self.projected_grad = None
        self.position = 0  # the model computes with θ + position·εZ of the current step
        self.momentum = {}  # matrix key -> N (m×r) of a LOZO matrix; tensor index -> dense momentum (float32)
        # LOZO matrices, keyed by tensor index (a 2-D tensor) or (index, expert) (each (m×n) slice of an
        # (experts, m, n) tensor of a mixture of experts: the paper's low rank is per matrix).
        self.matrices, self.keys = {}, {}
        for i, p in self.tensors if low_rank else ():
            if p.dim() in (2, 3):
                self.keys[i] = [i] if p.dim() == 2 else [(i, e) for e in range(p.shape[0])]
                for key in self.keys[i]:
                    self.matrices[key] = LowRankMatrix(
                        p, rank, eps, merge_periods, expert=expert_of(key), pair=self.pair
                    )
        # Dense tensors perturbed module by module (MeZO's default), else a float32 master copy of each
        # (master_weights), or none (in_place).
        self.transient = (
            set() if in_place or self.master_weights else {i for i, _ in self.tensors} - set(self.keys)
        )
        self.masters = {}  # tensor index -> float32 master copy (master_weights)
        # `compensated`: a half-precision tensor perturbed module by module keeps, in its own dtype, what its
        # weights' rounding left out of the updates (Kahan summation: +2 bytes a weight), instead of
        # rounding stochastically.
        self.compensation = {
            i: torch.zeros_like(p)
            for i, p in self.tensors
            if compensated and i in self.transient and p.dtype in (torch.float16, torch.bfloat16)
        }
        # Everything that retakes this run from its starting weights without a forward pass (`replay`): a
        # hash of those weights, every step's g and learning rates, and the steps at which settle() rounded.
        self.trajectory = {"start": None, "steps": [], "settled_at": []}
        self.model, self.side_path, self.dense_path, self.settle_hook = None, None, None, None
        self.pair_hook = None
        self._acquire()

    def _acquire(self):
        self.released = False
        if self.master_weights:
            self.masters = {
                i: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                for i, p in self.tensors
                if i not in self.keys
            }
        if self.model is not None and self.settle_hook is None:
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
            "master_weights": self.master_weights,
            "merge_periods": self.merge_periods,
            "queries": self.queries,
            "compensated": bool(self.compensation),
        }

    def attach(self, model):
        """Give `model` LOZO's side path (its forward computes with the effective weights), and make a
        state_dict() of it between steps (save_pretrained, torch.save) settle first, so it holds them."""
        self.model = model
        if self.settle_hook is not None:
            return
        self.settle_hook = model.register_state_dict_pre_hook(self._settle_before_saving)
        if self.pair is not None:
            if any(isinstance(key, tuple) for key in self.matrices):
                raise UsageError(
                    "--zo_batched_pair cannot split a mixture of experts' routed tokens into the pair's "
                    "parts; drop --zo_batched_pair"
                )
            self.pair_hook = model.register_forward_pre_hook(self._note_pair_batch, with_kwargs=True)
        # A pair perturbs every dense tensor module by module, from its master where it has one.
        dense = {i for i, _ in self.tensors if i not in self.keys} if self.pair else self.transient
        if dense:
            tensors = {id(p): i for i, p in self.tensors if i in dense}
            self.dense_path = DensePath(model, self, tensors, self.names)
        if not self.matrices:
            return
        by_id = {}
        for i, keys in self.keys.items():
            matrices = [self.matrices[key] for key in keys]
            by_id[id(self.tensors[i][1])] = matrices if isinstance(keys[0], tuple) else matrices[0]
        self.side_path = SidePath(model, by_id, self.names)

    def _note_pair_batch(self, model, args, kwargs):
        """The leading size of a paired forward's input (the model's first tensor argument)."""
        if self.position is not PAIR:
            return
        first = next(
            (x for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args) if x is not None), None
        )
        if first is None or first.dim() < 2 or first.shape[0] % self.pair.parts:
            raise UsageError("--zo_batched_pair: the model's input is not a paired batch; drop the option")
        keep = kwargs.get("logits_to_keep")
        kept = int(keep.sum()) if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool else None
        self.pair.sizes = (first.shape[0], first.shape[0] * first.shape[1], kept)

    def _settle_before_saving(self, module, prefix, keep_vars):
        if self.position == 0:  # between steps (mid-step, the weights are the step's business)
            self.settle()

    def _detach(self):
        for path in (self.side_path, self.dense_path, self.settle_hook, self.pair_hook):
            if path is not None:
                path.remove()
        self.side_path, self.dense_path, self.settle_hook, self.pair_hook = None, None, None, None

    def _seed(self, key, step=None, query=None):
        """Seed of tensor (or matrix key) `key`'s U or dense z at `step` for direction `query` (default: the
        current step and direction; direction 0 draws what a one-direction run draws)."""
        query = self.query if query is None else query
        key = as_tuple(key) + ((query,) if query else ())
        return stream_seed(self.seed, U_STREAM, self.zo_step if step is None else step, *key)

    def _rounding(self, key):
        device = self.tensors[as_tuple(key)[0]][1].device
        return seeded_generator(stream_seed(self.seed, ROUNDING_STREAM, self.zo_step, *as_tuple(key)), device)

    def begin_step(self):
        """This step's directions: U of every matrix, and at steps 0, ν, 2ν, … a new V."""
        if self.released:
            self._acquire()
        if self.replayable and self.zo_step == 0 and self.trajectory["start"] is None:
            self.trajectory["start"] = self.fingerprint()
        self.query = 0
        if self.zo_step % self.step_interval == 0:
            period = self.zo_step // self.step_interval
            for key, matrix in self.matrices.items():
                m, n = matrix.weight.shape
                seed = stream_seed(self.seed, V_STREAM, period, *as_tuple(key))
                previous = matrix.V
                matrix.begin_period(gaussian((n, self.rank), seed, matrix.param.device))
                if key in self.momentum:  # LOZO-M: the momentum carried into the new V's basis
                    self.momentum[key] = as_rows(self.momentum[key] @ (previous.T @ matrix.V) / n)
                if matrix.periods >= self.merge_periods:
                    matrix.merge(self._rounding(key), current=False)
        self._draw_U()

    def _draw_U(self):
        """U of this direction, and with the batched pair (one forward evaluates them all) of every one."""
        directions = range(self.queries) if self.pair is not None else [self.query]
        for key, matrix in self.matrices.items():
            matrix.Us = [self._U(key, k) for k in directions]
            matrix.U = matrix.Us[self.query if self.pair is not None else 0]

    def _U(self, key, query):
        matrix = self.matrices[key]
        U = gaussian((matrix.weight.shape[0], self.rank), self._seed(key, query=query), matrix.param.device)
        return as_rows(U.to(matrix.exact_dtype))  # (C's layout: the moves' multi-tensor operations need it)

    def begin_query(self, query):
        """Direction `query` (1 … queries − 1) of this step: its own U (the period's V) or dense z. The next
        `move_to` computes the model anew."""
        self.query = query
        if self.pair is None:
            self._draw_U()
        else:  # (two forwards on a pair's optimizer, as the benchmark times it) drawn with the step
            for matrix in self.matrices.values():
                matrix.U = matrix.Us[query]
        self.position = None  # every tensor is rewritten by the next move

    @torch.no_grad()
    def move_to(self, position):
        """Make the model compute with θ + position·εZ of this step (position PAIR: the batched pair)."""
        if position == self.position:
            return
        if self.position is None and self.in_place:  # a step failed half-way through the weights
            logger.warning("a zeroth-order step was interrupted mid-update: the weights are not restorable")
        delta = position - self.position if self.in_place and self.position is not None else None
        # A master's weights hold θ at position 0 and for the pair (whose forward perturbs module by module).
        written, before = (0 if x is PAIR else x for x in (position, self.position))
        move_all(list(self.matrices.values()), position)
        if written != before:
            self._write_from_masters([(i, p) for i, p in self.tensors if i in self.masters], written)
        for i, p in self.tensors if delta else ():  # MeZO in place: every move rounds
            if i not in self.keys:
                for start, z in dense_noise(p.numel(), self._seed(i), p.device, self.chunk):
                    p.data.view(-1)[start : start + len(z)].add_(z, alpha=delta * self.eps)
        self.position = position

    def evaluations(self, position):
        """(direction, sign) of each part of a forward at `position`: (this direction, position), or for the
        batched pair θ+εZ_k and θ−εZ_k of each direction k of the step, in turn."""
        if position is PAIR:
            return [(k, sign) for k in range(self.queries) for sign in (1, -1)]
        return [(self.query, position)]

    def _noise(self, i, numel, device, directions, step=None):
        """(start, {direction: z}) chunk by chunk: tensor i's dense z of each of `directions`, in step."""
        directions = sorted(set(directions))
        streams = [self._stream(numel, self._seed(i, step, k), device) for k in directions]
        for chunks in zip(*streams, strict=True):
            yield chunks[0][0], {k: z for k, (_, z) in zip(directions, chunks, strict=True)}

    def _stream(self, numel, seed, device):
        """dense_noise(numel, seed, …), kept until the step ends for a small tensor: a vector's z is drawn
        once a step instead of at each move and at the update (a launch each on a GPU, for every norm and
        bias)."""
        if not self._small(numel):
            return dense_noise(numel, seed, device, self.chunk)
        if seed not in self.small_z:
            self.small_z[seed] = next(dense_noise(numel, seed, device, self.chunk))[1]
        return [(0, self.small_z[seed])]

    def _small(self, numel):
        """Whether a tensor of `numel` numbers is a small one (a norm, a bias: one chunk of at most SMALL),
        whose z is kept for the step and which moves and updates with the others together."""
        return numel <= min(SMALL, self.chunk)

    def perturbed(self, i, weights, evaluations, outs=None):
        """[round(W + s·εz_k) for each (k, s) of `evaluations`] of tensor i (W: its master where it has
        one), in `outs` (default: new tensors like `weights`), from one draw of each z_k: what a module
        computes with during its forward under `DensePath` (one module's weights at a time)."""
        outs = outs or [torch.empty_like(weights) for _ in evaluations]
        flat = self.masters.get(i, weights).view(-1)
        for start, zs in self._noise(i, weights.numel(), weights.device, [k for k, _ in evaluations]):
            for (k, sign), out in zip(evaluations, outs, strict=True):
                end = start + len(zs[k])
                torch.add(flat[start:end], zs[k], alpha=sign * self.eps, out=out.view(-1)[start:end])
        return outs

    def perturbed_rows(self, i, weights, evaluations):
        """(rows, [round(W[rows] + s·εz_k[rows]) for each (k, s)]) for blocks of whole rows of a 2-D tensor i,
        from the same z as `perturbed`, in buffers of about `chunk` numbers refilled for each block: use a
        block before asking for the next one."""
        n, numel, flat = weights.shape[-1], weights.numel(), self.masters.get(i, weights).reshape(-1)
        size = max(1, self.chunk // n) * n
        blocks = [torch.empty(size, dtype=weights.dtype, device=weights.device) for _ in evaluations]
        filled, first = 0, 0
        for start, zs in self._noise(i, numel, weights.device, [k for k, _ in evaluations]):
            used, length = 0, len(next(iter(zs.values())))
            while used < length:
                take, at = min(length - used, size - filled), start + used
                for (k, sign), block in zip(evaluations, blocks, strict=True):
                    torch.add(flat[at : at + take], zs[k][used : used + take], alpha=sign * self.eps,
                              out=block[filled : filled + take])  # fmt: skip
                filled, used = filled + take, used + take
                if filled == size or start + used == numel:
                    yield slice(first, first + filled // n), [block[:filled].view(-1, n) for block in blocks]
                    first, filled = first + filled // n, 0

    def _write_from_masters(self, tensors, position):
        """p ← master + position·εz of each (i, p) of `tensors`, rounded to p's dtype once: the small ones
        (LOZO's vectors: norms, biases) in two multi-tensor operations."""
        if not tensors:
            return
        if position == 0:
            torch._foreach_copy_([p.data for _, p in tensors], [self.masters[i] for i, _ in tensors])
            return
        small = [(i, p) for i, p in tensors if self._small(p.numel())]
        for i, p in tensors:
            if not self._small(p.numel()):
                self.perturbed(i, p.data, [(self.query, position)], outs=[p.data])  # (reads the master)
        if small:
            zs = [self._stream(p.numel(), self._seed(i), p.device)[0][1].view(p.shape) for i, p in small]
            written = torch._foreach_add([self.masters[i] for i, _ in small], zs, alpha=position * self.eps)
            torch._foreach_copy_([p.data for _, p in small], written)

    def set_projected_grad(self, projected_grad):
        self.projected_grad = projected_grad

    @torch.no_grad()
    def step(self, closure=None):
        """W ← W − η(g·Z + λW) (LOZO-M: W − η(N·Vᵀ + λW)) for every tensor; the model ends at θ."""
        g = self.projected_grad
        if g is None:
            raise RuntimeError("ZOOptimizer.step() needs set_projected_grad() first")
        self.trajectory["steps"].append([g, [group["lr"] for group in self.param_groups]])
        gs = list(g) if isinstance(g, (list, tuple)) else [g]  # one g per direction (--zo_queries)
        if len(gs) != self.queries:
            raise RuntimeError(f"ZOOptimizer.step() needs {self.queries} projected gradients, got {len(gs)}")
        finite = all(math.isfinite(x) for x in gs)
        if not finite:
            self.skipped += 1
            gs = [0.0] * len(gs)
        restore = -self.position if self.in_place else 0
        self.position = None  # None until every tensor is updated (see move_to)
        # The groups are read now: the lr scheduler (and load_state_dict) replace their values.
        for group in self.param_groups:
            lr, decay = (group["lr"], 1.0 - group["lr"] * group["weight_decay"]) if finite else (0.0, 1.0)
            indices = [self.index[id(p)] for p in group["params"]]
            keys = [key for i in indices for key in self.keys.get(i, ())]
            directions = self._low_rank_directions(keys, self._projected_Us(keys, gs), finite)
            update_all([self.matrices[key] for key in keys], directions, lr, decay)
            dense = [(i, p) for i, p in zip(indices, group["params"], strict=True) if i not in self.keys]
            for batch in self._batches(dense):
                self._step_dense(batch, gs, lr, decay, restore, finite)
        self.zo_step += 1
        self.projected_grad = None
        self.position = 0
        self.small_z = {}

    def _projected_Us(self, keys, gs):
        """g·U of each matrix of `keys`, or with several directions the average of their g_k·U_k (all under
        the period's V), in multi-tensor operations."""
        if not keys:
            return []
        Us = [self._Us(key, len(gs)) for key in keys]
        total = torch._foreach_mul([U[0] for U in Us], gs[0] / len(gs))
        for k, g in enumerate(gs[1:], 1):
            total = torch._foreach_add(total, torch._foreach_mul([U[k] for U in Us], g / len(gs)))
        return total

    def _Us(self, key, queries):
        """The U of each of a step's `queries` directions of a matrix (kept with the batched pair, else the
        last one's only: the others drawn again)."""
        Us = self.matrices[key].Us
        return Us if len(Us) == queries else [self._U(key, k) for k in range(queries)]

    def _dense_directions(self, batch, gs):
        """(start, ds, g) chunk by chunk over the tensors (i, p) of `batch` (one, or small ones of one chunk
        each): the step's direction over each tensor's chunk is g·d, z and g for one direction, the average
        of g_k·z_k (and g = 1) for several."""
        streams = [self._noise(i, p.numel(), p.device, range(len(gs)), step=self.zo_step) for i, p in batch]
        for chunks in zip(*streams, strict=True):
            start, zs = chunks[0][0], [z for _, z in chunks]
            if len(gs) == 1:
                yield start, [z[0] for z in zs], gs[0]
                continue
            ds = torch._foreach_mul([z[0] for z in zs], gs[0] / len(gs))
            for k, g in enumerate(gs[1:], 1):
                torch._foreach_add_(ds, [z[k] for z in zs], alpha=g / len(gs))
            yield start, ds, 1.0

    def _low_rank_directions(self, keys, gUs, finite):
        """g·U of each matrix, or for LOZO-M its momentum N ← βN + (1−β)·g·U, started at N₀ = g₀U₀ as the
        released code starts it (not from zero, which would make the first steps (1−β) times smaller)."""
        if self.beta is None:
            return gUs
        if finite:
            going = [key for key in keys if key in self.momentum]
            if going:
                fresh = dict(zip(keys, gUs, strict=True))
                kept = torch._foreach_mul([self.momentum[key] for key in going], self.beta)
                added = torch._foreach_mul([fresh[key] for key in going], 1 - self.beta)
                self.momentum.update(zip(going, torch._foreach_add(kept, added), strict=True))
            for key, gU in zip(keys, gUs, strict=True):
                self.momentum.setdefault(key, gU)
        return [
            self.momentum[key] if key in self.momentum else torch.zeros_like(gU)
            for key, gU in zip(keys, gUs, strict=True)
        ]

    def _batches(self, tensors):
        """`tensors` ((i, p) pairs) in the batches `_step_dense` takes: tensors of one chunk each (norms,
        biases, a small model's matrices) packed in order into batches of up to a chunk in all where they
        are updated alike (with a master or not, with momentum or none yet, of one dtype); any other alone
        (a larger tensor, or one with a compensation buffer)."""
        batches, filling = [], {}  # filling: the batch each kind is filling, and its numbers so far
        for i, p in tensors:
            if p.numel() > self.chunk or i in self.compensation:
                batches.append([(i, p)])
                continue
            alike = (i in self.masters, i in self.momentum, p.dtype, p.device)
            batch, filled = filling.get(alike, (None, 0))
            if batch is None or filled + p.numel() > self.chunk:
                batch, filled = [], 0
                batches.append(batch)
            batch.append((i, p))
            filling[alike] = batch, filled + p.numel()
        return batches

    def _step_dense(self, batch, gs, lr, decay, restore, finite):
        """One pass, W ← decay·W − η(g·z or m), over each (i, p) of `batch` (one tensor, or several of one
        chunk each packed by `_batches`: in multi-tensor operations): on the master (then copied into the
        weights), on the weights in place (undoing the perturbation too), or for a tensor perturbed module by
        module on the weights computed in float32 and rounded once, stochastically in half precision
        (rounding to nearest would drop every update under half a unit in the last place, most of MeZO's at
        lr 1e-6 in bf16), or with a compensation buffer to nearest, the rounding error carried into the next
        update."""
        i, p = batch[0]  # (what decides how a batch is updated, its tensors share)
        first = self.beta is not None and i not in self.momentum and finite
        for j, q in batch if first else ():  # m₀ = g₀z₀, as N₀ = g₀U₀
            self.momentum[j] = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # Only LOZO-M / MeZO with momentum keep any.
        momenta = [self.momentum[j].view(-1) for j, _ in batch] if i in self.momentum else None
        master = i in self.masters
        weights = [(self.masters[j] if master else q.data).view(-1) for j, q in batch]
        back = decay * restore * self.eps if self.in_place else 0.0  # in place: undo the perturbation too
        rounded = not master and not self.in_place and p.dtype != torch.float32
        compensation = self.compensation.get(i)
        generators = [self._rounding(j) for j, _ in batch] if rounded and compensation is None else None
        for start, zs, g in self._dense_directions(batch, gs):
            stored = [w[start : start + len(z)] for w, z in zip(weights, zs, strict=True)]
            ws = float_copies(stored) if rounded else stored
            if compensation is not None:  # (a batch of one)
                carried = compensation.view(-1)[start : start + len(zs[0])]
                ws[0].add_(carried)
            if decay != 1.0:
                torch._foreach_mul_(ws, decay)
            if momenta is None:
                torch._foreach_add_(ws, zs, alpha=back - lr * g)
            else:
                ms = [m[start : start + len(z)] for m, z in zip(momenta, zs, strict=True)]
                if finite:
                    torch._foreach_mul_(ms, self.beta)
                    torch._foreach_add_(ms, zs, alpha=g if first else (1 - self.beta) * g)
                if back:
                    torch._foreach_add_(ws, zs, alpha=back)
                torch._foreach_add_(ws, ms, alpha=-lr)
            if compensation is not None:
                stored[0].copy_(ws[0])
                carried.copy_(ws[0].sub_(stored[0]))  # (w − round(w) is exact in float32)
            elif rounded:
                round_all_into(stored, ws, generators)
            elif master:
                written = [
                    q.data.view(-1)[start : start + len(z)] for (_, q), z in zip(batch, zs, strict=True)
                ]
                torch._foreach_copy_(written, ws)

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
        for key, matrix in self.matrices.items():
            matrix.merge(self._rounding(key), current=True)

    def release(self):
        """settle(), then leave the model alone (the end of training; HF may load the best checkpoint next).
        begin_step() takes the parameters up again."""
        self.settle()
        self._detach()
        self.masters, self.released = {}, True

    def effective_weight(self, p):
        """θ + position·εZ of tensor p in float32, as the model computes with it (tests and benchmarks)."""
        i = self.index[id(p)]
        if self.position is PAIR:
            raise RuntimeError("a batched pair computes with 2q weights: move to +1 or -1 for one of them")
        if i in self.keys:
            weights = [self.matrices[key].effective() for key in self.keys[i]]
            return weights[0] if p.dim() == 2 else torch.stack(weights)
        exact = torch.promote_types(p.dtype, torch.float32)
        if i in self.transient and self.position:
            return self.perturbed(i, p.detach(), self.evaluations(self.position))[0].to(exact)
        weight = self.masters[i] if i in self.masters else p.detach()
        weight = weight.to(exact, copy=True)
        if i in self.masters and self.position:
            z = torch.cat([z.clone() for _, z in dense_noise(p.numel(), self._seed(i), p.device, self.chunk)])
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
            "compensation": {i: c.cpu() for i, c in self.compensation.items()},
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
        self.momentum = {as_key(k): m.to(device[as_tuple(as_key(k))[0]]) for k, m in zo["momentum"].items()}
        for i, carried in zo.get("compensation", {}).items():
            self.compensation[int(i)].copy_(carried)
        for i, master in zo.get("masters", {}).items():
            if int(i) not in self.masters:
                raise UsageError(
                    "the checkpoint holds float32 master weights (MeZO before inference-memory training); "
                    "resume it with --zo_master_weights"
                )
            self.masters[int(i)].copy_(master)
        if "matrices" in zo:
            for key, matrix_state in zo["matrices"].items():
                self.matrices[as_key(key)].load(matrix_state)
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
        algorithms: a CUDA generator draws other numbers than a CPU one for the same seed, and in other
        numbers for other chunks of dense noise) and which tensors are trained, in which order."""
        tensors = [[self.names.get(id(p), str(i)), list(p.shape)] for i, p in self.tensors]
        return {
            "device": self.tensors[0][1].device.type,
            "noise_chunk": self.chunk,
            "torch": torch.__version__,
            "tensors": hashlib.sha256(json.dumps(tensors).encode()).hexdigest(),
        }

    def state_digest(self):
        """SHA-256 of the small state every step changes: each LOZO matrix's factors, scale and momentum, and
        every tensor of at most CHUNK elements (its master, if any). A replay that took other steps ends
        with another digest."""
        hasher = hashlib.sha256()
        for i, p in self.tensors:
            if i in self.keys:
                parts = []
                for key in self.keys[i]:
                    matrix = self.matrices[key]
                    k = matrix.rank + matrix.used
                    parts += [matrix.left[:k], matrix.right[:k], matrix.C, torch.tensor([matrix.scale])]
                    parts += [self.momentum[key]] if key in self.momentum else []
            else:
                parts = [self.masters.get(i, p.detach())] if p.numel() <= CHUNK else []
                parts += [self.compensation[i]] if i in self.compensation and p.numel() <= CHUNK else []
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
        recorded = {"noise_chunk": CHUNK} | record  # (records that do not say it drew in chunks of CHUNK)
        changed = {k: (recorded[k], v) for k, v in here.items() if recorded[k] != v}
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
