"""LOZO's side path: the model computes with every LOZO matrix's effective weight W + A·Bᵀ while W itself
stays as it is, so that no perturbation or small update is ever rounded into half-precision weights.

A module that reads W (m×n) gets the low-rank part added to its output, in one of four ways:

    x·Wᵀ     nn.Linear, F.linear(x, W), x @ W.T        output += (x·B)·Aᵀ
    x·W      transformers' Conv1D, addmm(b, x, W)       output += (x·A)·Bᵀ
    W[ids]   nn.Embedding, F.embedding(ids, W)          output += A[ids]·Bᵀ
    Wᵀ[ids]  F.embedding(ids, W.T) (peft's LoRA emb.)   output += B[ids]·Aᵀ

Two mechanisms, chosen per matrix on the first forward pass:
  * typed hooks: a forward hook on the nn.Linear / Conv1D / nn.Embedding that owns W (and runs that
    class's own forward) adds the side term to its output. That is the fast path: one hook and two small
    products a call, no dispatch;
  * the reading mode, a TorchFunctionMode active in the forward of the modules that read W in any other way
    (subclasses with a forward of their own such as FalconLinear, a parent module's F.linear on a child's
    weight, peft's ParameterDicts, mixture-of-experts weights stored as (experts, m, n), custom modules):
    it follows W through transposes, dtype conversions and expert slices to the product that consumes it.

The first forward after `attach` is watched: every read of every LOZO matrix anywhere in the model is seen
by the mode, matrices read outside their owner's typed forward move to the reading mode, and any read the
side path cannot follow (or a matrix the forward never reads) is a one-line error naming the matrix, the
reading module and the way out. Later forwards run only the hooks the watched one showed to be needed.
"""

import itertools
import logging

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from transformers.pytorch_utils import Conv1D

from utils import UsageError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # elements per row block of a merge: no parameter-sized temporary

X_WT, X_W, ROWS, COLS = "x·Wᵀ", "x·W", "W[ids]", "Wᵀ[ids]"

# The position of a batched ± pair (--zo_batched_pair): the forward's batch is the micro-batch 2q times, for
# the q directions of the step: its parts computed at θ+εZ₁, θ−εZ₁, θ+εZ₂, θ−εZ₂, … in that order.
PAIR = "±"


class PairBatch:
    """The batch a paired forward is running, as the leading sizes its reads may have: its rows (the model
    input's first dimension), its tokens (rows × sequence length, as modules that flatten their input see
    it, e.g. OPT's feed-forward blocks) and its kept positions (an LM head fed only the positions of
    `logits_to_keep`), each in batch order; set from the model's input by the optimizer's root hook. The
    batch has `parts` equal parts (2 per direction); `part` checks that a read's input has one of those
    sizes, so that its parts are the evaluations: tokens routed to experts, or a sequence-first layout, are
    refused rather than split wrongly. `running` is the part whose forward a module that owns dense tensors
    runs alone (`DensePath`): reads inside it compute that part only."""

    def __init__(self, directions=1):
        self.sizes, self.parts, self.running = (), 2 * directions, None

    def batched(self, x):
        return x.dim() > 0 and x.shape[0] in self.sizes

    def part(self, x, what):
        """The leading size of one part of `x`."""
        if not self.batched(x):
            raise UsageError(
                f"--zo_batched_pair cannot split {what}: it reads a tensor of leading size {x.shape[0]}, "
                f"not one of the paired batch's (rows, tokens, kept positions: {self.sizes}; tokens routed "
                "to experts, or a sequence-first layout); drop --zo_batched_pair"
            )
        return x.shape[0] // self.parts


TRANSPOSED = {X_WT: X_W, X_W: X_WT, ROWS: COLS, COLS: ROWS}
TYPED_READS = ((torch.nn.Linear, X_WT), (Conv1D, X_W), (torch.nn.Embedding, ROWS))


def stochastic_round(values, dtype, generator):
    """float32 `values` in a narrower `dtype`, each rounded to one of its two neighbours at random, with the
    probability that makes the expected result the value itself. (Rounding to nearest would drop every
    change smaller than half a unit in the last place: most of a merged update at lr 1e-6 in bf16.)"""
    if values.dtype == dtype:
        return values
    return round_into(torch.empty(values.shape, dtype=dtype, device=values.device), values.clone(), generator)


def round_into(out, values, generator):
    """out ← `values` (float32) rounded stochastically to out's dtype, as `stochastic_round`; `values` is
    overwritten (the update's and the merge's own float32 block): no temporary of its size in bf16."""
    if values.dtype == out.dtype:
        return out.copy_(values)
    if values.dtype == torch.float32 and out.dtype in (torch.bfloat16, torch.float16):
        return out.copy_(stochastic_round_bits_(values, out.dtype, generator))
    return out.copy_(stochastic_round_by_neighbours(values, out.dtype, generator))


def float_copies(tensors):
    """float32 copies of `tensors` (of one dtype), as views of one buffer in which each starts at a multiple
    of 4 numbers: `round_all_into` rounds them all at once, each with the random bits it would draw alone.
    (A buffer's padding between copies is never read back.)"""
    sizes = [t.numel() for t in tensors]
    starts = [0, *itertools.accumulate(4 * ((n + 3) // 4) for n in sizes)]
    buffer = torch.empty(starts[-1], dtype=torch.float32, device=tensors[0].device)
    copies = [buffer[a : a + n].view(t.shape) for a, n, t in zip(starts[:-1], sizes, tensors, strict=True)]
    torch._foreach_copy_(copies, tensors)
    return copies


def round_all_into(outs, copies, generators):
    """round_into(out, copy, generator) of each of `outs`, for `copies` made by `float_copies`: in bf16 and
    fp16 a few operations over their buffer (and a draw of random bits each), on a GPU a few launches for
    many small tensors (a model's norms and biases) instead of ten for each."""
    if len(copies) == 1 or outs[0].dtype not in CUT_BITS:
        for out, values, generator in zip(outs, copies, generators, strict=True):
            round_into(out, values, generator)
        return
    buffer = copies[0]._base
    starts = [values.storage_offset() - copies[0].storage_offset() for values in copies]
    stochastic_round_bits_(buffer, outs[0].dtype, generators, starts)
    torch._foreach_copy_(outs, copies)


def stochastic_round_by_neighbours(values, dtype, generator):
    """The general rule: each value's two neighbours in `dtype` and a uniform draw between them."""
    nearest = values.to(dtype)
    error = values - nearest.float()
    neighbour = torch.nextafter(nearest, torch.where(error > 0, torch.inf, -torch.inf).to(dtype))
    gap = (neighbour.float() - nearest.float()).abs()
    away = torch.rand(values.shape, generator=generator, device=values.device) * gap < error.abs()
    return torch.where(away, neighbour, nearest)


# float32 mantissa bits below the last one each half dtype keeps, where its numbers are float32's with those
# bits cut: bf16 everywhere, fp16 from its smallest normal magnitude 2⁻¹⁴ up.
CUT_BITS = {torch.bfloat16: 16, torch.float16: 13}
FLOAT16_SMALLEST_NORMAL = 2.0**-14


def stochastic_round_bits_(values, dtype, generator, starts=(0,)):
    """`values` (contiguous float32) made exact in `dtype` (bf16 or fp16) in place, rounded stochastically:
    adding c uniform random bits to the c bits `dtype` cuts from a float32 (CUT_BITS) and then cutting them
    rounds the magnitude up with probability equal to the cut fraction, and converting the result is exact.
    fp16's subnormals are evenly spaced by 2⁻²⁴, as float32's numbers are (by 2⁻²⁴ too) from 2⁻¹⁴ to 2⁻¹³:
    a value under 2⁻¹⁴ is moved there by ±2⁻¹⁴, rounded, and moved back (exact, but for the float32 rounding
    of the first move: 2⁻¹⁴ of a spacing at most). The random bits come as full-range 64-bit draws, four
    weights' to a draw (3x cheaper on a CPU than 32-bit draws of a range), and nothing here waits for a GPU:
    MeZO's update rounds every weight at every step. With several `generator`s, the parts of `values` from
    each of `starts` (multiples of 4) to the next take their bits from one each, as each would alone."""
    bits, n, cut = values.view(torch.int32), values.numel(), CUT_BITS[dtype]
    offset = None
    if dtype == torch.float16:  # ±2⁻¹⁴ (the value's sign) where |value| < 2⁻¹⁴, else 0; in place, one buffer
        offset = values.abs().lt_(FLOAT16_SMALLEST_NORMAL).mul_(FLOAT16_SMALLEST_NORMAL)
        values.add_(torch.copysign(offset, values, out=offset))
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=values.device)
    generators = generator if isinstance(generator, list) else [generator]
    for generator, start, end in zip(generators, starts, [*starts[1:], n], strict=True):
        # from the lowest int64 to the top: all 64 bits
        draws[start // 4 : (end + 3) // 4].random_(-(1 << 63), None, generator=generator)
    noise = torch.empty(values.shape, dtype=torch.int32, device=values.device)
    noise.copy_(draws.view(torch.int16)[:n].view(values.shape)).bitwise_and_((1 << cut) - 1)  # c bits
    bits.add_(noise).bitwise_and_(-(1 << cut))
    if offset is not None:
        values.sub_(offset)
    return values


# Below this many rows, a CPU computes a half-precision matrix's side term with float32 copies of its factors:
# its half-precision kernels for these thin products cost a fixed ~25-40 µs a call (float32: ~3 µs; measured
# on an avx512_bf16 EPYC, 8×576 by 576×16), which dominates small batches; above, they stream better.
SMALL_ROWS = 64


def add_product_(output, left, right):
    """output += left @ right over the last dimension (output (..., b), left (..., k), right (k, b)): one
    addmm_ when the dtypes agree, else added in the factors' dtype and rounded once to the output's, block
    of rows by block, so that no product in the factors' dtype is output-sized (an LM head's output is rows
    × vocabulary)."""
    flat, left = output.view(-1, output.shape[-1]), left.view(-1, left.shape[-1])
    if output.dtype == right.dtype:
        flat.addmm_(left, right)
        return output
    rows = max(1, CHUNK // output.shape[-1])
    if flat.shape[0] <= rows:
        flat.add_(left @ right)
        return output
    for start in range(0, flat.shape[0], rows):
        flat[start : start + rows].add_(left[start : start + rows] @ right)
    return output


class LowRankMatrix:
    """A LOZO matrix W (m×n) and its factors. The model computes with the effective weight

        scale · (W + [C + position·(ε/scale)·U | A_old] · [V | V_old]ᵀ)

    W, the parameter (or one expert's slice of it), is written only by `merge`. C (m×r, float32) is this V
    period's update so far and A_old, V_old the finished periods not merged yet (`periods` of them); `scale`
    is the weight decay since the last merge, kept as one number so that decay never rounds a factor.

    The factors live transposed in two buffers of W's dtype, `left` and `right` ((1 + capacity + q)·r rows
    of m and n numbers): rows 0…r−1 hold this period, the next rows A_old and V_old, and the forward
    multiplies by their first r + `used` rows. At the batched pair's position (`PAIR`), r more rows follow
    for each of the step's q directions, (ε/scale)·U_kᵀ and V again: each part of the batch keeps only its
    direction's products, negated for the parts at θ−εZ_k. C accumulates
    in float32 and is rounded once per move; the merge writes exactly what the forward computed with. In
    float16 (on a GPU) the rows of `right` are V's columns scaled to unit length (and `left`'s rows scaled up
    to match), so that x·V cannot overflow float16's range for any input whose norm fits in it: the side
    path runs in float16, no float32 copy.

    C and U (m×r) are laid out as this period's rows of `left` are (the transpose of a contiguous r×m), so
    that the moves of all matrices are a few multi-tensor operations (`move_all`)."""

    def __init__(self, param, rank, eps, capacity, expert=None, pair=None):
        self.param, self.expert, self.rank, self.eps = param, expert, rank, eps
        self.pair = pair  # the PairBatch of a batched pair
        m, n = self.weight.shape
        directions = pair.parts // 2 if pair is not None else 1
        rows = (1 + capacity + directions) * rank  # this period, `capacity` finished ones, the pair's ±εU_k
        self.left = torch.zeros(rows, m, dtype=param.dtype, device=param.device)
        self.right = torch.zeros(rows, n, dtype=param.dtype, device=param.device)
        self.exact_dtype = torch.promote_types(param.dtype, torch.float32)  # of C, U and the merge
        self.C = as_rows(torch.zeros(m, rank, dtype=self.exact_dtype, device=param.device))
        self.U = torch.zeros_like(self.C)
        self.Us = [self.U]  # U of each direction a paired forward evaluates (set by the optimizer)
        self.signs = {}  # the pair's part-by-direction signs, by dtype and dimensions (see `keep_own`)
        self.normalized = param.dtype == torch.float16
        self._set_norms(torch.ones(rank, dtype=self.exact_dtype, device=param.device))
        # On a CPU, float32 copies of half-precision factors (the same values) for small batches, and for
        # every float16 product (a CPU without float16 matrix instructions emulates them); made lazily, so
        # that training on large batches never holds them.
        self.mirrored = param.device.type == "cpu" and param.dtype in (torch.float16, torch.bfloat16)
        self.used, self.scale, self.position = 0, 1.0, 0
        # Whether C may be non-zero (an update with lr ≠ 0 since it was last zeroed): known on the host, since
        # asking C itself would wait for a GPU at every step.
        self.updated = False
        self.active = False  # whether the low-rank part is non-zero (else the forward skips it)
        self.At = self.Bt = self.left[:0]
        self._views()

    @property
    def weight(self):
        """W: the parameter's data, or one expert's (m×n) slice of a stacked (experts, m, n) parameter."""
        return self.param.data if self.expert is None else self.param.data[self.expert]

    @property
    def V(self):
        V = self.right[: self.rank].T.to(self.exact_dtype, copy=True)
        return V * self.norms if self.normalized else V

    @property
    def periods(self):
        return self.used // self.rank

    def _views(self):
        k = self.rank + self.used + (len(self.Us) * self.rank if self.position is PAIR else 0)
        if k != len(self.At):  # (views of the buffers, which are written in place: only k changes them)
            self.At, self.Bt = self.left[:k], self.right[:k]  # Aᵀ (k×m), Bᵀ (k×n): the forward's factors
        self.mirrors = None  # float32 copies, made when a small batch first needs them after a change

    @property
    def current_rows(self):
        """This period's rows of the left factor, as an m×r view (C's layout)."""
        return self.left[: self.rank].T

    def _set_norms(self, norms):
        """V's column norms (r) and, for the moves' multi-tensor products, as an m×r matrix in C's layout."""
        self.norms = norms
        if self.normalized:
            self.norm_rows = as_rows(norms.expand(self.C.shape[0], -1))

    def begin_period(self, V):
        """A new V: this period's update joins the unmerged ones (unless it is zero, as at lr 0)."""
        r = self.rank
        if self.updated:
            self.left[r + self.used : 2 * r + self.used] = (
                self.C * self.norms if self.normalized else self.C
            ).T
            self.right[r + self.used : 2 * r + self.used] = self.right[:r]
            self.used += r
        self.C.zero_()
        self.updated = False
        if self.normalized:
            self._set_norms(V.norm(dim=0).clamp_min(torch.finfo(torch.float32).tiny))
            V = V / self.norms
        self.right[:r] = V.T
        self.move_to(self.position)

    def move_to(self, position):
        move_all([self], position)

    def _moved(self, position):
        """After `move_all` wrote this period's rows at `position`: the pair's rows, the forward's view."""
        self.position = position
        if position is PAIR:
            r, k = self.rank, self.rank + self.used
            for U in self.Us:
                U = (self.eps / self.scale) * U
                self.left[k : k + r] = (U * self.norms if self.normalized else U).T
                self.right[k : k + r] = self.right[:r]
                k += r
        self.active = position != 0 or self.used > 0 or self.updated or self.scale != 1.0
        self._views()

    def merge(self, generator, current):
        """W ← scale·(W + A_old·V_oldᵀ (+ C·Vᵀ with `current`)), rounded once, row block by row block. The
        merged factors restart from zero."""
        first = 0 if current else self.rank
        A = self.left[first : self.rank + self.used].T.to(self.exact_dtype)
        V = self.right[first : self.rank + self.used].to(self.exact_dtype)
        if self.scale != 1.0 or A.any():
            W = self.weight
            rows = max(1, CHUNK // W.shape[1])
            for start in range(0, W.shape[0], rows):
                block = W[start : start + rows]
                exact = torch.addmm(block.to(self.exact_dtype), A[start : start + rows], V).mul_(self.scale)
                round_into(block, exact, generator)
        if current:
            self.C.zero_()
            self.updated = False
        else:
            self.C.mul_(self.scale)  # this period's update, now relative to the merged W
        self.used, self.scale = 0, 1.0
        self.move_to(self.position)

    def add_to(self, read, x, output, bias=None):
        """`output` of a read of W (x·Wᵀ + bias, x·W + bias, W[ids] or Wᵀ[ids]), turned in place into the
        output of the same read of the effective weight W + A·Bᵀ."""
        if not self.active:
            return output
        alone = self.position is PAIR and self.pair.running is not None  # inside one part's forward
        if self.position is PAIR and not alone and x.shape[0] == 1 != self.pair.sizes[0]:
            # A read shared by the batch (positions (1, T), broadcast later): each part gets its own rows.
            rows = self.pair.sizes[0]
            x, output = x.expand(rows, *x.shape[1:]), output.expand(rows, *output.shape[1:]).contiguous()
        At, Bt = self.At, self.Bt
        if self.mirrored and (self.normalized or output.numel() <= SMALL_ROWS * output.shape[-1]):
            if self.mirrors is None:
                self.mirrors = self.At.float(), self.Bt.float()
            At, Bt = self.mirrors
        if read is X_WT:  # x·Wᵀ + (x·B)·Aᵀ
            h, second = F.linear(x if x.dtype == Bt.dtype else x.to(Bt.dtype), Bt), At
        elif read is X_W:  # x·W + (x·A)·Bᵀ
            h, second = F.linear(x if x.dtype == At.dtype else x.to(At.dtype), At), Bt
        elif read is ROWS:  # W[ids] + A[ids]·Bᵀ
            h, second = F.embedding(x, At.T), Bt
        else:  # Wᵀ[ids] + B[ids]·Aᵀ
            h, second = F.embedding(x, Bt.T), At
        if self.position is PAIR:
            what = f"a ({self.C.shape[0]}, {self.right.shape[1]}) matrix"
            self.keep_own(h, None if alone else self.pair.part(x, what))
        add_product_(output, h, second)
        if self.scale != 1.0:  # scale·(read of W + side) + bias
            output.mul_(self.scale)
            if bias is not None:
                output.add_(bias, alpha=1.0 - self.scale)
        return output

    def keep_own(self, h, part):
        """Each part of a paired batch (of leading size `part`) keeps the products of its own direction's
        ±εU_k (the last q·r columns of h): +1 for its θ+εZ_k part, −1 for its θ−εZ_k part, 0 for the other
        directions'. `part` None: h is the running part's alone."""
        key = (h.dtype, h.dim())
        if key not in self.signs:
            q, r = len(self.Us), self.rank
            signs = torch.zeros(2 * q, q * r, dtype=h.dtype, device=h.device)
            for k in range(q):
                signs[2 * k, k * r : (k + 1) * r], signs[2 * k + 1, k * r : (k + 1) * r] = 1, -1
            self.signs[key] = signs.view(2 * q, *[1] * (h.dim() - 1), q * r)
        width = len(self.Us) * self.rank
        if part is None:
            h[..., -width:].mul_(self.signs[key][self.pair.running])
        else:
            h.view(2 * len(self.Us), part, *h.shape[1:])[..., -width:].mul_(self.signs[key])

    def effective(self):
        """The effective weight, as the forward computes with it, in float32 (for tests and benchmarks: it is
        parameter-sized)."""
        exact = self.exact_dtype
        if self.position is PAIR:
            raise RuntimeError("a batched pair computes with 2q weights: move to +1 or -1 for one of them")
        return torch.addmm(self.weight.to(exact), self.At.T.to(exact), self.Bt.to(exact)).mul_(self.scale)

    def state(self):
        k = self.rank + self.used
        state = {
            "left": self.left[:k].cpu(),
            "right": self.right[:k].cpu(),
            "C": self.C.cpu(),
            "scale": self.scale,
        }
        return state | ({"norms": self.norms.cpu()} if self.normalized else {})

    def load(self, state):
        k = len(state["left"])
        self.left[:k], self.right[:k] = state["left"], state["right"]
        self.used, self.scale = k - self.rank, state["scale"]
        self.C = as_rows(state["C"].to(self.param.device))
        self.updated = bool(self.C.any())
        if "norms" in state:
            self._set_norms(state["norms"].to(self.param.device))
        self.move_to(self.position)


def as_rows(matrix):
    """An m×r `matrix` laid out as the transpose of a contiguous r×m one: as a left factor's rows are."""
    return matrix.T.contiguous().T


def move_all(matrices, position):
    """`move_to(position)` of each of `matrices`: this period's rows of the left factor ←
    C + position·(ε/scale)·U (times V's norms), computed in float32 and rounded once. Matrices alike move
    together, in multi-tensor operations: on a GPU a few launches for all of them, where one a matrix (three
    moves a step) would bound a small model's step. (At PAIR, the pair's ±εU_k get rows of their own.)"""
    for (_, normalized, alpha), group in _alike(matrices, position):
        Cs = [matrix.C for matrix in group]
        values = Cs if alpha == 0 else torch._foreach_add(Cs, [matrix.U for matrix in group], alpha=alpha)
        if normalized:
            values = torch._foreach_mul(values, [matrix.norm_rows for matrix in group])
        torch._foreach_copy_([matrix.current_rows for matrix in group], values)
    for matrix in matrices:
        matrix._moved(position)


def update_all(matrices, directions, lr, decay):
    """Effective weight ← decay · effective weight − lr · direction · Vᵀ for each of `matrices` and its
    direction (m×r), back at position 0, in multi-tensor operations (see `move_all`)."""
    for matrix in matrices:
        matrix.scale *= decay
        matrix.updated = matrix.updated or lr != 0
    direction_of = dict(zip(map(id, matrices), directions, strict=True))
    for (scale, _, _), group in _alike(matrices, 0):
        torch._foreach_add_([m.C for m in group], [direction_of[id(m)] for m in group], alpha=-lr / scale)
    move_all(matrices, 0)


def _alike(matrices, position):
    """`matrices` in groups that one multi-tensor operation can take, each with what it has in common:
    (scale, normalized, the alpha of U at `position`); a group also shares a dtype and a device."""
    groups = {}
    for matrix in matrices:
        alpha = 0.0 if position in (0, PAIR) else position * matrix.eps / matrix.scale
        key = (matrix.scale, matrix.normalized, alpha, matrix.left.dtype, matrix.left.device)
        groups.setdefault(key, []).append(matrix)
    return [(key[:3], group) for key, group in groups.items()]


# Reads of a matrix that involve no values (the modules that own one may ask for its dtype or shape).
METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.data_ptr,
    torch.Tensor.stride,
    torch.Tensor.is_floating_point,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
}
METADATA_PROPERTIES = {
    torch.Tensor.shape,
    torch.Tensor.dtype,
    torch.Tensor.device,
    torch.Tensor.ndim,
    torch.Tensor.requires_grad,
    torch.Tensor.is_cuda,
    torch.Tensor.layout,
    torch.Tensor.is_sparse,
    torch.Tensor.is_quantized,
    torch.Tensor.is_meta,
}
TRANSPOSES = {torch.Tensor.t, torch.t}
TRANSPOSE_PROPERTIES = {torch.Tensor.T, torch.Tensor.mT}
SAME_VALUES = {  # reads that pass W's values on unchanged: the product that consumes the result reads W
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.half,
    torch.Tensor.bfloat16,
    torch.Tensor.type,
    torch.Tensor.contiguous,
    torch.Tensor.detach,
    torch.Tensor.type_as,
}
PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
ADDMMS = {torch.addmm, torch.Tensor.addmm}


def function_name(func):
    return getattr(func, "__name__", None) or str(func)


class ReadingMode(TorchFunctionMode):
    """Adds the side term to the product that consumes a LOZO matrix, however the module reads it: W or its
    transpose, converted or not, a whole matrix or one expert's slice. `watched` (the first forward) also
    sees the reads of typed matrices, to tell which are read outside their owner's forward."""

    def __init__(self, side_path):
        super().__init__()
        self.side_path = side_path
        self.depth = 0  # modules inside which the mode is entered (it is entered once, by the outermost)
        self.derived = {}  # id of a tensor derived from W -> (tensor, matrix or stack, read of W it is)

    def enter(self, module, args):
        if self.depth == 0:
            self.__enter__()
        self.depth += 1

    def leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            self.derived.clear()
            self.__exit__(None, None, None)

    def lookup(self, tensor):
        """(matrices, read) when `tensor` is a LOZO matrix this mode handles, or derived from one; else None.
        `matrices` is a LowRankMatrix, or a list of them for a stacked (experts, m, n) parameter."""
        if not isinstance(tensor, torch.Tensor):
            return None
        found = self.derived.get(id(tensor))
        if found is not None:
            return found[1:]
        matrices = self.side_path.handled(tensor)
        return None if matrices is None else (matrices, X_WT)

    def derive(self, result, matrices, read):
        self.derived[id(result)] = (result, matrices, read)
        return result

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA or getattr(func, "__self__", None) in METADATA_PROPERTIES:
            return func(*args, **kwargs)
        leaves = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        found = [(leaf, self.lookup(leaf)) for leaf in leaves]
        found = [(leaf, hit) for leaf, hit in found if hit is not None]
        if not found:
            return func(*args, **kwargs)
        (tensor, (matrices, read)), *others = found
        if others:
            return self.refuse(tensor, matrices, function_name(func))
        result = self.read(func, args, kwargs, tensor, matrices, read)
        if result is NotImplemented:
            return self.refuse(tensor, matrices, function_name(func))
        return result

    def read(self, func, args, kwargs, tensor, matrices, read):
        """The result of `func` on `tensor` (derived from W as `read`), with the side term where it is a
        product; NotImplemented for reads the side path cannot follow."""
        first = args[0] if args else None
        second = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other", kwargs.get("mat2")))
        if isinstance(matrices, list):  # a stacked (experts, m, n) parameter: only one expert's slice is read
            if func is torch.Tensor.__getitem__ and first is tensor and read == X_WT:
                index = args[1]
                one = isinstance(index, int) or (
                    isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point()
                )
                if not one:  # a slice of several experts, or of rows: no single matrix is read
                    return NotImplemented
                return self.derive(func(*args, **kwargs), matrices[int(index)], X_WT)
            return NotImplemented
        if (
            func in TRANSPOSES
            or getattr(func, "__self__", None) in TRANSPOSE_PROPERTIES
            or (
                func is torch.Tensor.transpose
                and sorted(d % 2 for d in args[1:3]) == [0, 1]
                and first is tensor
            )
        ):
            return self.derive(func(*args, **kwargs), matrices, TRANSPOSED[read])
        if func in SAME_VALUES and first is tensor:
            return self.derive(func(*args, **kwargs), matrices, read)
        if func is F.linear and second is tensor and read in (X_WT, X_W):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return matrices.add_to(read, first, func(*args, **kwargs), bias)
        if func in PRODUCTS and second is tensor and read in (X_WT, X_W):
            return matrices.add_to(TRANSPOSED[read], first, func(*args, **kwargs))  # x @ W reads as x·W
        if func in ADDMMS and len(args) > 2 and args[2] is tensor and read in (X_WT, X_W):
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                return NotImplemented
            return matrices.add_to(TRANSPOSED[read], args[1], func(*args, **kwargs), args[0])
        if func is F.embedding and second is tensor and read in (X_WT, X_W):
            if (args[3] if len(args) > 3 else kwargs.get("max_norm")) is not None:
                return NotImplemented  # max_norm rewrites the rows it reads
            return matrices.add_to(ROWS if read == X_WT else COLS, first, func(*args, **kwargs))
        return NotImplemented

    def refuse(self, tensor, matrices, reader):
        matrix = matrices[0] if isinstance(matrices, list) else matrices
        raise UsageError(self.side_path.cannot_train(matrix.param, reader))


class RunningModules:
    """The modules whose forward is running, innermost last, tracked by global module hooks between
    `start(root)` (from the root's forward pre-hook) and `stop()`."""

    def __init__(self):
        self.stack, self.handles = [], []

    def start(self, root):
        # The root itself is on the stack: the global hooks start inside its forward, but end around it.
        self.stack = [root]
        self.handles = [
            register_module_forward_pre_hook(self._push),
            register_module_forward_hook(self._pop, always_call=True),
        ]

    def stop(self):
        for handle in self.handles:
            handle.remove()
        self.stack, self.handles = [], []

    def innermost(self, default=None):
        return self.stack[-1] if self.stack else default

    def _push(self, module, args):
        self.stack.append(module)

    def _pop(self, module, args, output):  # (a forward hook that returned something would replace the output)
        self.stack.pop()


class SidePath:
    """Everything that makes `model` compute with the effective weights of `matrices` (a dict: id of a
    parameter -> its LowRankMatrix, or the list of its experts' matrices for an (experts, m, n) parameter).
    `remove()` leaves the model as it was."""

    def __init__(self, model, matrices, names):
        self.model, self.matrices, self.names = model, matrices, names
        self.typed = {}  # id of a parameter read by typed hooks -> [(owner module, read)]
        self.reading = {}  # id of a parameter read through the mode -> its matrices
        self.mode = ReadingMode(self)
        self.hooks, self.typed_hooks, self.running = [], {}, RunningModules()
        self.watching, self.watched = False, False
        self.seen, self.moved, self.readers = set(), set(), set()  # of the watched forward
        self._switch_experts_to_eager()
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in matrices:
                    continue
                read = typed_read(module, name, param)
                if read is None:
                    self.reading[id(param)] = matrices[id(param)]
                else:
                    self.typed.setdefault(id(param), []).append((module, read))
        self.install()

    def install(self):
        """Hook the model: the typed hooks, the reading mode's modules, and the watch until a forward ran."""
        for param_id, owners in self.typed.items():
            for module, read in owners:
                self._hook_typed(module, read, param_id)
        for module in self.readers if self.watched else ():
            self.hooks.append(module.register_forward_pre_hook(self.mode.enter))
            self.hooks.append(module.register_forward_hook(self.mode.leave, always_call=True))
        if not self.watched:
            self.hooks.append(self.model.register_forward_pre_hook(self._watch))
            self.hooks.append(self.model.register_forward_hook(self._unwatch, always_call=True))

    def _switch_experts_to_eager(self):
        """transformers' grouped_mm expert kernels take all experts' weights in one call: the eager loop reads
        one expert's (m×n) slice at a time, which the reading mode follows."""
        if not any(isinstance(m, list) for m in self.matrices.values()):
            return
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        implementation = getattr(getattr(model, "config", None), "_experts_implementation", "eager")
        if implementation not in (None, "eager"):
            logger.info("LOZO reads expert weights one expert at a time: experts implementation set to eager")
            model.set_experts_implementation("eager")

    def _hook_typed(self, module, read, param_id):
        matrix = self.matrices[param_id]
        bias = module.bias if read is not ROWS else None

        def add_side(module, args, output):
            if self.watching:
                self.seen.add(param_id)
            return matrix.add_to(read, args[0], output, bias)

        self.typed_hooks.setdefault(param_id, []).append(module.register_forward_hook(add_side))

    def handled(self, tensor):
        """The matrices of `tensor` when the mode must add its side term: while watching, every LOZO matrix
        read outside its owner's typed forward (noting who read it); later, those found so."""
        if not self.watching:
            return self.reading.get(id(tensor))
        matrices = self.matrices.get(id(tensor))
        if matrices is None:
            return None
        reader = self.reader()
        if any(owner is reader for owner, _ in self.typed.get(id(tensor), ())):
            return None  # its owner's typed forward: the typed hook adds the side term
        self.seen.add(id(tensor))
        self.readers.add(reader)
        if id(tensor) in self.typed:
            self.moved.add(id(tensor))
        return matrices

    def reader(self):
        return self.running.innermost(self.model)

    # ---- the watched first forward ----

    def _watch(self, model, args):
        if self.watched or self.watching:
            return
        self.watching, self.seen, self.moved, self.readers = True, set(), set(), set()
        self.running.start(model)
        self.mode.enter(model, args)

    def _unwatch(self, model, args, output):
        if not self.watching:
            return
        self.mode.leave(model, args, output)
        self.running.stop()
        self.watching = False
        if output is None:  # the forward failed: watch the next one
            return
        self.watched = True
        # A parameter read outside its owner's typed forward is read through the mode everywhere: its typed
        # hooks go, and its owners join the modules in whose forward the mode is entered.
        for param_id in self.moved:
            for handle in self.typed_hooks.pop(param_id):
                handle.remove()
            self.readers.update(owner for owner, _ in self.typed.pop(param_id))
            self.reading[param_id] = self.matrices[param_id]
        self.remove()
        self.install()
        unread = [param for param in self.parameters() if id(param) not in self.seen]
        if unread:
            raise UsageError(self.cannot_train(unread[0], None))

    def parameters(self):
        for matrices in self.matrices.values():
            yield (matrices[0] if isinstance(matrices, list) else matrices).param

    def cannot_train(self, param, reader, module=None):
        name = self.names.get(id(param), f"a {tuple(param.shape)} matrix")
        if reader is None:
            how = "the model's forward never reads it (or reads it where the side path cannot see)"
        else:
            how = f"{type(module or self.reader()).__name__} reads it with {reader}"
        return (
            f"--trainer LOZO cannot train {name}: {how}, and LOZO adds its low-rank perturbation to linear "
            "and embedding reads only; freeze it or use --trainer zo"
        )

    def remove(self):
        """Unhook the model (`install` hooks it again, as the watched forward left it)."""
        for handle in self.hooks + [h for hs in self.typed_hooks.values() for h in hs]:
            handle.remove()
        self.hooks, self.typed_hooks = [], {}
        self.running.stop()


def typed_read(module, name, param):
    """How `module` reads its parameter `name`, if it is a typed read: the module runs its class's own
    forward (subclasses with a forward of their own, FalconLinear's input @ weight.T or OPT's learned
    positions, are followed by the reading mode instead)."""
    if name != "weight" or param.dim() != 2:
        return None
    if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
        return None  # max_norm rewrites the rows it reads: the mode refuses it when read
    return next((read for cls, read in TYPED_READS if type(module).forward is cls.forward), None)
