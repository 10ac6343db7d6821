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
from torch.utils._pytree import tree_leaves

from side_path import METADATA, METADATA_PROPERTIES, RunningModules, function_name
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
    copy during the forward of the modules that own it, while `optimizer.position` is not 0."""

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
        self.swapped = {}  # id -> [the weights' own data, how many owners' forwards are running]
        # A tied tensor's perturbed copy (an embedding read again as the LM head), kept until the model's
        # forward ends, so that it is drawn once a forward: {id: (position, copy)}.
        self.built = {}
        # One buffer per shape and dtype, reused by every module of that shape: a fresh allocation for each
        # module and forward would fault in new pages each time (a third of a float32 MeZO step on a CPU).
        self.pool = {}
        self.watched, self.watching, self.hooks, self.running = False, False, [], RunningModules()
        self.busy = False  # swapping (its own reads of the weights are not the model's)
        self.install()

    def install(self):
        for module, kind in self.blocked.items():
            module.forward = self._blocked_forward(module, kind)
        for module in self.owned:
            self.hooks.append(module.register_forward_pre_hook(self._swap))
            self.hooks.append(module.register_forward_hook(self._restore, always_call=True))
        if self.tied:
            self.hooks.append(self.model.register_forward_hook(self._forget, always_call=True))
        if not self.watched:
            self.hooks.append(self.model.register_forward_pre_hook(self._watch))
            self.hooks.append(self.model.register_forward_hook(self._unwatch, always_call=True))

    def _forget(self, model, args, output):
        self.built = {}

    def remove(self):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for module in self.blocked:
            module.__dict__.pop("forward", None)  # the class's own forward again

    def _blocked_forward(self, module, kind):
        """`module`'s forward while attached: its class's own at θ, else its weight perturbed by blocks."""
        own_forward, perturbed_forward = {
            "linear": (torch.nn.Linear.forward, self._linear_by_blocks),
            "embedding": (torch.nn.Embedding.forward, self._embedding_by_blocks),
        }[kind]

        def forward(x):
            position = self.optimizer.position
            if not position:
                return own_forward(module, x)
            self.busy = True  # its own reads of the weight are not the model's
            try:
                return perturbed_forward(module, x, position)
            finally:
                self.busy = False

        return forward

    def _linear_by_blocks(self, module, x, position):
        bias = module.bias
        if bias is not None and id(bias) in self.tensors:
            bias = self.optimizer.perturbed(self.tensors[id(bias)], bias.data, position)
        out = x.new_empty(*x.shape[:-1], module.out_features)
        i = self.tensors[id(module.weight)]
        for rows, block in self.optimizer.perturbed_rows(i, module.weight.data, position):
            out[..., rows] = F.linear(x, block, None if bias is None else bias[rows])
        return out

    def _embedding_by_blocks(self, module, ids, position):
        out = F.embedding(ids, module.weight.data, module.padding_idx)
        flat, rows_out = ids.reshape(-1), out.view(-1, out.shape[-1])
        i = self.tensors[id(module.weight)]
        for rows, block in self.optimizer.perturbed_rows(i, module.weight.data, position):
            hit = (flat >= rows.start) & (flat < rows.stop)
            if hit.any():
                rows_out[hit] = block[flat[hit] - rows.start]
        return out

    def _swap(self, module, args):
        position = self.optimizer.position
        if not position:
            return
        self.busy = True
        for param_id in self.owned[module]:
            entry = self.swapped.get(param_id)
            if entry is not None:  # tied: another owner's forward already swapped it
                entry[1] += 1
                continue
            param = self.params[param_id]
            own = param.data
            built = self.built.get(param_id)
            if built is None or built[0] != position:
                buffer = None if param_id in self.tied else self.pool.pop((own.shape, own.dtype), None)
                copy = self.optimizer.perturbed(self.tensors[param_id], own, position, out=buffer)
                built = (position, copy)
                if param_id in self.tied:
                    self.built[param_id] = built
            param.data = built[1]
            self.swapped[param_id] = [own, 1]
        self.busy = False

    def _restore(self, module, args, output):
        for param_id in self.owned[module]:
            entry = self.swapped.get(param_id)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                self.busy = True
                param = self.params[param_id]
                if param_id not in self.tied:
                    self.pool[entry[0].shape, entry[0].dtype] = param.data
                param.data = entry[0]
                del self.swapped[param_id]
                self.busy = False

    # ---- the watched first perturbed forward ----

    def _watch(self, model, args):
        if self.watched or self.watching or not self.optimizer.position:
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
        raise UsageError(
            f"MeZO cannot perturb {name} module by module: {module} reads it with {reader} outside the "
            "module that owns it; add --zo_master_weights (a float32 master copy) or --zo_in_place"
        )


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
                if id(leaf) in path.params and id(leaf) not in path.swapped and path.params[id(leaf)] is leaf:
                    path.refuse(id(leaf), function_name(func))
        return func(*args, **kwargs)
