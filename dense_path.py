"""MeZO's dense perturbation at inference memory, without ever writing it into the weights.

A module that owns trainable weights computes, during its own forward, with round(W + position·εz): the
weights' data is swapped for a buffer holding that sum (built in chunks from the same seeded z the update
uses) when its forward starts and swapped back when it ends. So one module's weights are copied at a time,
θ itself is written only by the update, and at learning rate 0 it stays bit for bit what it was, in any
dtype. A weight read by another module than its owner (at a perturbed forward) would be read unperturbed:
the first perturbed forward is watched, and such a read is a one-line error naming the weight, the module
and the ways out (`--zo_master_weights`, `--zo_in_place`), which perturb the weights themselves.

A large `nn.Linear` or `nn.Embedding` (an LM head, the token embeddings: 21 % of SmolLM2's weights) is not
copied whole: its forward is replaced by one that perturbs its weight block of rows by block, about 2²⁰
numbers at a time, and computes those rows' outputs (or looks up the ids in them) from each block.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from side_path import METADATA, METADATA_PROPERTIES, PAIR, RunningModules, function_name
from utils import UsageError

BLOCKED_ABOVE = 1 << 22  # weights of more elements are perturbed block by block (see the module's doc)


def blocked_kind(module):
    """Whether `module` is a large Linear or Embedding that runs its class's own forward: "linear",
    "embedding" or None."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.numel() <= BLOCKED_ABOVE:
        return None
    if type(module).forward is torch.nn.Linear.forward:
        return "linear"
    if type(module).forward is torch.nn.Embedding.forward and module.max_norm is None:
        return "embedding"
    return None


class DensePath:
    """Swaps each trainable tensor of `tensors` (id of a parameter -> its optimizer index) for its perturbed
    copy during the forward of the modules that own it, while `optimizer.position` is not 0. With a batched
    pair (`PAIR`), such a module runs its forward once per part of the batch (two per direction of the
    step), with that part's copy."""

    def __init__(self, model, optimizer, tensors, names):
        self.model, self.optimizer, self.tensors, self.names = model, optimizer, tensors, names
        self.owned = {}  # module -> ids of the tensors it owns
        for module in model.modules():
            own = [id(p) for p in module.parameters(recurse=False) if id(p) in tensors]
            if own:
                self.owned[module] = own
        self.params = {id(p): p for p in model.parameters() if id(p) in tensors}
        self.blocked = {m: kind for m in self.owned if id(getattr(m, "weight", None)) in tensors and
                        (kind := blocked_kind(m))}  # fmt: skip
        for module in self.blocked:  # its forward perturbs its own tensors
            del self.owned[module]
        owners = [param_id for own in self.owned.values() for param_id in own]
        self.tied = {param_id for param_id in owners if owners.count(param_id) > 1}
        self.swapped = {}  # id -> [the weights' own data, owners' forwards running, copies to give back]
        # A tied tensor's perturbed copies (an embedding read again as the LM head), kept until the model's
        # forward ends, so that they are drawn once a forward: {id: (position, copies)}.
        self.built = {}
        # Buffers per shape and dtype, reused by every module of that shape: a fresh allocation for each
        # module and forward would fault in new pages each time (a third of a float32 MeZO step on a CPU).
        self.pool = {}
        self.kept_rows = {}  # embedding -> (step and query, ids, its rows at −1), from the +1 forward
        self.watched, self.watching, self.hooks, self.running = False, False, [], RunningModules()
        self.forwards = {}  # module -> the forward it had before this path replaced it (None: its class's)
        self.busy = False  # swapping (its own reads of the weights are not the model's)
        self.install()

    def install(self):
        for module, kind in self.blocked.items():
            self._replace_forward(module, self._blocked_forward(module, kind))
        for module in self.owned:
            self.hooks.append(module.register_forward_pre_hook(self._swap))
            self.hooks.append(module.register_forward_hook(self._restore, always_call=True))
            if self.optimizer.pair is not None:
                self._replace_forward(module, self._paired_forward(module, module.forward))
        if self.tied:
            self.hooks.append(self.model.register_forward_hook(self._forget, always_call=True))
        if not self.watched:
            self.hooks.append(self.model.register_forward_pre_hook(self._watch))
            self.hooks.append(self.model.register_forward_hook(self._unwatch, always_call=True))

    def _replace_forward(self, module, forward):
        self.forwards[module] = module.__dict__.get("forward")
        module.forward = forward

    def _forget(self, model, args, output):
        self.built = {}

    def remove(self):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for module, forward in self.forwards.items():  # the forward it had (its class's own, or a wrapper's)
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        self.forwards = {}

    @property
    def part(self):
        """In the forward of a paired module: which part (of evaluations(PAIR)) is running, else None."""
        return None if self.optimizer.pair is None else self.optimizer.pair.running

    def evaluating(self):
        """The (direction, sign) of each part the running forward computes: the optimizer's position's, or
        inside one part of a paired module's forward, that part's."""
        evaluations = self.optimizer.evaluations(self.optimizer.position)
        return evaluations if self.part is None else [evaluations[self.part]]

    def swaps(self, param_id):
        """Whether a tensor computes with perturbed copies now (a master's weights are written by the
        optimizer at ±1; a pair perturbs every dense tensor here)."""
        position = self.optimizer.position
        return position is PAIR or (
            position in (1, -1) and self.tensors[param_id] in self.optimizer.transient
        )

    # ---- copies ----

    def _copies(self, param_id, evaluations):
        """[round(W + s·εz_k) for each (k, s) of `evaluations`] of a tensor: drawn now into pooled buffers,
        or for a tied tensor once a forward."""
        key = (self.optimizer.position, tuple(evaluations))
        built = self.built.get(param_id)
        if built is not None and built[0] == key:
            return built[1]
        own, tied = self.params[param_id].data, param_id in self.tied
        outs = None if tied else [self._take(own) for _ in evaluations]
        copies = self.optimizer.perturbed(self.tensors[param_id], own, evaluations, outs)
        if tied:
            self.built[param_id] = (key, copies)
        return copies

    def _take(self, like):
        free = self.pool.get((like.shape, like.dtype))
        return free.pop() if free else torch.empty_like(like)

    def _give_back(self, param_id, copies):
        if param_id not in self.tied:
            for copy in copies:
                self.pool.setdefault((copy.shape, copy.dtype), []).append(copy)

    def _put(self, param_id, copy, copies=None):
        """Make a tensor compute with `copy` (nested owners of a tied tensor share the first one's)."""
        entry = self.swapped.get(param_id)
        if entry is not None:
            entry[1] += 1
            return
        param = self.params[param_id]
        self.swapped[param_id] = [param.data, 1, copies]
        param.data = copy

    def _take_back(self, param_id):
        entry = self.swapped.get(param_id)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.params[param_id].data = entry[0]
            if entry[2] is not None:
                self._give_back(param_id, entry[2])
            del self.swapped[param_id]

    # ---- one position: hooks around the owner's forward ----

    def _swap(self, module, args):
        if self.optimizer.position not in (1, -1):
            return
        self.busy = True
        for param_id in self.owned[module]:
            if self.swaps(param_id):
                if param_id in self.swapped:
                    self._put(param_id, None)
                else:
                    copies = self._copies(param_id, self.evaluating())
                    self._put(param_id, copies[0], copies)
        self.busy = False

    def _restore(self, module, args, output):
        if self.optimizer.position not in (1, -1):
            return
        self.busy = True
        for param_id in self.owned[module]:
            self._take_back(param_id)
        self.busy = False

    # ---- the batched pair: the owner's forward once per part ----

    def _paired_forward(self, module, original):
        def forward(*args, **kwargs):
            if self.optimizer.position is not PAIR:
                return original(*args, **kwargs)
            own = [param_id for param_id in self.owned[module] if param_id not in self.swapped]
            self.busy = True  # (inside a paired ancestor's part: that part's copies only)
            copies = {param_id: self._copies(param_id, self.evaluating()) for param_id in own}
            self.busy = False
            try:
                if self.part is not None:
                    chosen = {param_id: part_copies[0] for param_id, part_copies in copies.items()}
                    return self._run_part(module, original, chosen, self.part, args, kwargs)
                parts = split_pair(args, kwargs, self.optimizer.pair, type(module).__name__)
                outputs = []
                for part, (part_args, part_kwargs) in enumerate(parts):
                    chosen = {param_id: part_copies[part] for param_id, part_copies in copies.items()}
                    outputs.append(self._run_part(module, original, chosen, part, part_args, part_kwargs))
                return join_pair(outputs, self.optimizer.pair, type(module).__name__)
            finally:
                for param_id, pair in copies.items():
                    self._give_back(param_id, pair)

        return forward

    def _run_part(self, module, original, copies, part, args, kwargs):
        """The module's forward for one part of the batch, its tensors swapped for `copies` (that part's)."""
        pair = self.optimizer.pair
        outer, pair.running = pair.running, part
        self.busy = True
        for param_id in self.owned[module]:
            self._put(param_id, copies.get(param_id))
        self.busy = False
        try:
            return original(*args, **kwargs)
        finally:
            self.busy = True
            for param_id in self.owned[module]:
                self._take_back(param_id)
            self.busy = False
            pair.running = outer

    # ---- large Linear and Embedding layers: block of rows by block ----

    def _blocked_forward(self, module, kind):
        """`module`'s forward while attached: its class's own at θ, else its weight perturbed by blocks."""
        own_forward, perturbed_forward = {
            "linear": (torch.nn.Linear.forward, self._linear_by_blocks),
            "embedding": (torch.nn.Embedding.forward, self._embedding_by_blocks),
        }[kind]

        def forward(x):
            if not self.optimizer.position or not self.swaps(id(module.weight)):  # (a master wrote it at ±1)
                return own_forward(module, x)
            self.busy = True  # its own reads of the weight are not the model's
            try:
                return perturbed_forward(module, x, self.evaluating())
            finally:
                self.busy = False

        return forward

    def _parts(self, module, tensor, evaluations):
        """The parts of `tensor` computed at each of `evaluations`: itself, or the paired batch's parts."""
        if len(evaluations) == 1:
            return [tensor]
        return tensor.split(self.optimizer.pair.part(tensor, type(module).__name__))

    def _linear_by_blocks(self, module, x, evaluations):
        bias = module.bias
        biases = [bias] * len(evaluations)
        if bias is not None and id(bias) in self.tensors and self.swaps(id(bias)):
            biases = self.optimizer.perturbed(self.tensors[id(bias)], bias.data, evaluations)
        out = x.new_empty(*x.shape[:-1], module.out_features)
        xs, outs = self._parts(module, x, evaluations), self._parts(module, out, evaluations)
        parts = list(zip(xs, outs, biases, strict=True))
        i = self.tensors[id(module.weight)]
        for rows, blocks in self.optimizer.perturbed_rows(i, module.weight.data, evaluations):
            for (x_part, out_part, b), block in zip(parts, blocks, strict=True):
                out_part[..., rows] = F.linear(x_part, block, None if b is None else b[rows])
        return out

    def _embedding_by_blocks(self, module, ids, evaluations):
        """The rows of `ids` at `evaluations`. At +1 (two forwards), the same rows at −1 come from the same
        draw and are kept for the −1 forward of the same ids that follows, which then draws nothing: a tied
        embedding (21 % of SmolLM2's weights) is drawn once a step for the lookups, besides the LM head's."""
        optimizer = self.optimizer
        key, position = (optimizer.zo_step, optimizer.query), optimizer.position
        kept = self.kept_rows.pop(module, None)
        if position == -1 and kept is not None and kept[0] == key and torch.equal(kept[1], ids):
            return kept[2]
        out = F.embedding(ids, module.weight.data, module.padding_idx)
        if position == 1:
            minus = out.clone()
            self.kept_rows[module] = (key, ids.clone(), minus)
            parts, evaluations = [(ids, out), (ids, minus)], [(optimizer.query, 1), (optimizer.query, -1)]
        else:
            parts = zip(*(self._parts(module, t, evaluations) for t in (ids, out)), strict=True)
        parts = [(ids_part.reshape(-1), out_part.view(-1, out.shape[-1])) for ids_part, out_part in parts]
        i = self.tensors[id(module.weight)]
        for rows, blocks in self.optimizer.perturbed_rows(i, module.weight.data, evaluations):
            for (flat, rows_out), block in zip(parts, blocks, strict=True):
                place_rows(rows_out, flat, rows, block)
        return out

    # ---- the watched first perturbed forward ----

    def _watch(self, model, args):
        if self.watched or self.watching or not any(self.swaps(param_id) for param_id in self.params):
            return
        self.watching = True
        self.running.start(model)
        self.mode = UnswappedReads(self)
        self.mode.__enter__()

    def _unwatch(self, model, args, output):
        if not self.watching:
            return
        self.mode.__exit__(None, None, None)
        self.running.stop()
        self.watching = False
        self.watched = output is not None  # a failed forward: watch the next one
        if self.watched:
            self.remove()
            self.install()

    def refuse(self, param_id, reader):
        name = self.names.get(param_id, "a trained tensor")
        module = type(self.running.innermost(self.model)).__name__
        way_out = (
            "drop --zo_batched_pair"
            if self.optimizer.pair is not None
            else "add --zo_master_weights (a float32 master copy) or --zo_in_place"
        )
        raise UsageError(
            f"cannot perturb {name} module by module: {module} reads it with {reader} outside the module "
            f"that owns it; {way_out}"
        )


# Devices that place an embedding's rows without counting the ids a block holds (see `place_rows`).
GATHERING_DEVICES = {"cuda"}


def place_rows(out, ids, rows, block):
    """out[j] ← block[ids[j] − rows.start] for each j whose id falls in `rows` (a block of an embedding's
    rows). A CPU indexes the ids that do; a GPU would wait for itself to count them (twice a block), so it
    gathers a row for every id (clamped into the block) and keeps those that fall in it."""
    hit = (ids >= rows.start) & (ids < rows.stop)
    if ids.device.type not in GATHERING_DEVICES:
        if hit.any():
            out[hit] = block[ids[hit] - rows.start]
        return
    gathered = block[(ids - rows.start).clamp_(0, len(block) - 1)]
    out.copy_(torch.where(hit.unsqueeze(-1), gathered, out))


class UnswappedReads(TorchFunctionMode):
    """The watched forward: a trained tensor read while no owner's forward has it swapped is refused."""

    def __init__(self, dense_path):
        super().__init__()
        self.dense_path = dense_path

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        path = self.dense_path
        if (
            not path.busy
            and func not in METADATA
            and getattr(func, "__self__", None) not in METADATA_PROPERTIES
        ):
            for leaf in tree_leaves((args, kwargs)):
                if (
                    id(leaf) in path.params
                    and id(leaf) not in path.swapped
                    and path.params[id(leaf)] is leaf
                    and path.swaps(id(leaf))
                ):
                    path.refuse(id(leaf), function_name(func))
        return func(*args, **kwargs)


def split_pair(args, kwargs, pair, what):
    """The (args, kwargs) of a paired forward as its parts: every tensor of the paired batch's leading size
    cut into its `pair.parts` parts, anything else passed to each."""
    flat = all(not isinstance(x, (list, tuple, dict)) for x in (*args, *kwargs.values()))
    leaves, spec = ([*args, *kwargs.values()], None) if flat else tree_flatten((args, kwargs))
    batched = [isinstance(x, torch.Tensor) and pair.batched(x) for x in leaves]
    if not any(batched) and any(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 for x in leaves):
        return [(args, kwargs)] * pair.parts  # inputs shared by the batch (positions (1, T)): see join_pair
    if not any(batched):
        raise UsageError(
            f"--zo_batched_pair cannot split the forward of {what}: none of its inputs has the paired "
            f"batch's leading sizes {pair.sizes}; drop --zo_batched_pair"
        )
    n = pair.parts
    cuts = [x.chunk(n) if split else [x] * n for x, split in zip(leaves, batched, strict=True)]
    parts = []
    for cut in zip(*cuts, strict=True):
        if spec is None:
            parts.append((tuple(cut[: len(args)]), dict(zip(kwargs, cut[len(args) :], strict=True))))
        else:
            parts.append(tree_unflatten(list(cut), spec))
    return parts


def join_pair(outputs, pair, what):
    """The parts' outputs of a paired forward as one: their tensors concatenated along the batch (an output
    shared by the batch, of leading size 1, expanded to a part's rows first)."""
    if all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in outputs):
        if outputs[0].shape[0] == 1 != pair.sizes[0]:
            outputs = [x.expand(pair.sizes[0] // pair.parts, *x.shape[1:]) for x in outputs]
        return torch.cat(outputs)
    flats = [tree_flatten(output)[0] for output in outputs]
    spec = tree_flatten(outputs[0])[1]
    joined = []
    for values in zip(*flats, strict=True):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            joined.append(torch.cat(values))
        elif not isinstance(first, torch.Tensor) and all(value == first for value in values):
            joined.append(first)
        else:
            raise UsageError(
                f"--zo_batched_pair cannot join the parts' outputs of {what}; drop --zo_batched_pair"
            )
    return tree_unflatten(joined, spec)
