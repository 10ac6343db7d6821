"""What the side path follows besides the typed modules (a parent reading a child's weight, peft's LoRA
embedding), what it refuses, what a save writes, and float16 on real activations."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from zoo import perturbed_steps

import dense_path
from utils import CountedOperations, UsageError
from zo_optimizer import PAIR, ZOOptimizer


def lozo(model, **kwargs):
    names = {id(p): n for n, p in model.named_parameters()}
    settings = dict(lr=0.05, eps=0.01, seed=3, low_rank=True, step_interval=1, merge_periods=4) | kwargs
    optimizer = ZOOptimizer([p for p in model.parameters() if p.requires_grad], names=names, **settings)
    optimizer.attach(model)
    return optimizer


def steps(optimizer, model, inputs, grads=(0.9, -1.3, 0.5)):
    perturbed_steps(optimizer, model, inputs, grads)


class ParentReadsChild(torch.nn.Module):
    """A head that is the embedding read by its parent with F.linear (weights reused outside the module that
    owns them), and a child module whose own weight is read by a sibling's forward too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids)))
        h = h + F.linear(h, self.proj.weight.T.contiguous())  # the transposed weight, as x·W
        return F.linear(h, self.emb.weight)


@torch.no_grad()
def test_weights_read_outside_their_module_get_the_side_term():
    model, plain = ParentReadsChild(), ParentReadsChild()
    ids = torch.tensor([[1, 5, 7, 19]])
    optimizer = lozo(model)
    steps(optimizer, model, {"ids": ids})
    optimizer.begin_step()
    optimizer.move_to(+1)
    plain.load_state_dict({n: optimizer.effective_weight(p) for n, p in model.named_parameters()})
    torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_peft_lora_on_embeddings_and_attention_computes_the_effective_weights(tiny_llama_dir):
    """peft's LoRA embedding keeps A and B in ParameterDicts read as F.embedding(x, A.T) and x @ B.T."""

    def load():
        config = LoraConfig(r=2, target_modules=["embed_tokens", "q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(1)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), config)

    model, plain = load(), load()
    ids = torch.tensor([[2, 100, 2000, 31, 4000, 7]])
    optimizer = lozo(model)
    lora_embedding = [n for n, p in model.named_parameters() if "lora_embedding" in n]
    assert len(lora_embedding) == 2 and all(p.dim() == 2 for p in optimizer.side_path.parameters())
    steps(optimizer, model, {"input_ids": ids})
    for position in (+1, 0):
        optimizer.begin_step() if position else None
        optimizer.move_to(position)
        weights = {n: optimizer.effective_weight(p) for n, p in model.named_parameters() if p.requires_grad}
        plain.load_state_dict(weights, strict=False)
        torch.testing.assert_close(
            model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6
        )


def test_a_matrix_the_forward_never_reads_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.unused = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = lozo(model)
    optimizer.begin_step()
    optimizer.move_to(+1)
    with pytest.raises(
        UsageError, match=r"cannot train unused: the model's forward never reads it.*--trainer zo"
    ):
        model(torch.randn(2, 4))


@torch.no_grad()
def test_save_pretrained_and_state_dict_between_steps_hold_the_effective_weights(tiny_opt_dir, tmp_path):
    """A save mid-run (a callback, user code) settles first: what it writes is what the model computes
    with, and the run goes on computing with the same weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[2, 100, 2000, 31, 4000, 7]])
    optimizer = lozo(model, lr=1e-3, merge_periods=8)
    steps(optimizer, model, {"input_ids": ids})
    assert any(m.active for m in optimizer.matrices.values())  # updates live in the factors, unmerged
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name, param in model.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], param.detach()), name
    assert not any(m.active for m in optimizer.matrices.values())  # settled: the weights hold everything
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0.02, atol=0.02)
    steps(optimizer, model, {"input_ids": ids}, grads=(0.2,))  # and training goes on


@torch.no_grad()
def test_float16_side_path_stays_finite_and_close_on_real_activations(smollm2_dir):
    """On a GPU float16 computes the side term in float16 (no float32 copy of the input, no float32 output):
    V's columns are scaled to unit length, so x·V is bounded by |x|. With that arithmetic (forced here on the
    CPU) on SmolLM2's real activations at θ+εZ, with the widest side path a run carries, the logits equal
    float32's to float16's precision."""
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 378, 4473, 314]])
    logits = {}
    for dtype in (torch.float32, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).eval()
        optimizer = lozo(model, lr=1e-6, eps=1e-3, merge_periods=4)
        for matrix in optimizer.matrices.values():
            matrix.mirrored = False  # the products in float16, as a GPU computes them
        for _ in range(3):
            optimizer.begin_step()
            optimizer.move_to(+1)
            optimizer.move_to(-1)
            optimizer.set_projected_grad(50.0)
            optimizer.step()
        optimizer.begin_step()
        optimizer.move_to(+1)
        if dtype == torch.float16:
            matrix = next(iter(optimizer.matrices.values()))
            assert matrix.left.dtype == matrix.right.dtype == torch.float16 and not matrix.mirrored
            assert torch.allclose(
                matrix.right[: matrix.rank].float().norm(dim=1), torch.ones(matrix.rank), atol=1e-3
            )
        logits[dtype] = model(input_ids=ids).logits.float()
    assert torch.isfinite(logits[torch.float16]).all()
    error = (logits[torch.float16] - logits[torch.float32]).norm() / logits[torch.float32].norm()
    assert error < 5e-3, error


def test_an_expert_stack_read_other_than_one_expert_at_a_time_is_refused():
    """A stacked (experts, m, n) weight is E LOZO matrices: a slice of several experts reads none of them."""

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, 5))

        def forward(self, x):
            return F.linear(x, self.weight[0:2].sum(0))

    model = torch.nn.Sequential(Experts())
    optimizer = lozo(model)
    optimizer.begin_step()
    optimizer.move_to(+1)
    with pytest.raises(UsageError, match=r"cannot train 0\.weight: Experts reads it with __getitem__"):
        model(torch.randn(2, 5))


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's values into Python (on a GPU, each waits for the device)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "settings",
    [
        dict(low_rank=True),
        dict(low_rank=True, momentum=0.9),
        dict(low_rank=True, queries=2),
        dict(master_weights=True, momentum=0.9),
        {},
        dict(momentum=0.9),
    ],
    ids=["LOZO", "LOZO-M", "LOZO-q2", "MeZO-master-momentum", "MeZO", "MeZO-momentum"],
)
@torch.no_grad()
def test_a_step_moves_and_updates_all_tensors_in_a_few_operations(settings, dtype):
    """The moves to θ±εZ and back and the update take every LOZO matrix, and every small tensor (LOZO's
    norms and biases, and MeZO's: here its 16×8 matrices too), in multi-tensor operations: as many for 24
    matrices and 24 vectors as for 3 and 3 (a few operations a tensor, three moves and an update a step,
    would bound a small model's step on a GPU by its launches; MeZO's update in half precision made ten a
    tensor). Only the draws grow with them (U, and its copy into C's layout, for each matrix and
    direction; a vector's z once a step; the random bits of a stochastic rounding), uncounted here."""

    def operations(count):
        torch.manual_seed(0)
        matrices = [torch.nn.Parameter(torch.randn(16, 8, dtype=dtype)) for _ in range(count)]
        vectors = [torch.nn.Parameter(torch.randn(16, dtype=dtype)) for _ in range(count)]
        optimizer = ZOOptimizer(matrices + vectors, lr=1e-3, seed=3, step_interval=2, **settings)
        counted = CountedOperations()
        for step, g in enumerate((0.9, -1.3, 0.5)):  # (momentum starts at the first step)
            optimizer.begin_step()
            with counted if step == 2 else contextlib.nullcontext():
                for query in range(optimizer.queries):
                    if query:
                        optimizer.begin_query(query)
                    optimizer.move_to(+1)
                    optimizer.move_to(-1)
                optimizer.set_projected_grad(g if optimizer.queries == 1 else [g, -g])
                optimizer.step()
        draws = ("randn", "clone", "normal_", "random_")
        return [name for name in counted.names if name.split(".")[0] not in draws]

    few, many = operations(3), operations(24)
    assert len(few) == len(many) <= 40, few


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_a_gpu_moves_and_updates_all_tensors_in_a_few_kernels(dtype):
    """On a GPU the multi-tensor operations take their fused path (a launch for many tensors: C, U and the
    left factors' rows share a layout, as do a vector's master, z and weights), so the moves and the update
    of 24 matrices and 24 vectors launch fewer kernels than there are tensors."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    tensors = [torch.nn.Parameter(torch.randn(64, 32, dtype=dtype, device="cuda")) for _ in range(24)]
    tensors += [torch.nn.Parameter(torch.randn(64, dtype=dtype, device="cuda")) for _ in range(24)]
    optimizer = ZOOptimizer(tensors, lr=1e-3, seed=3, low_rank=True)
    optimizer.begin_step()
    optimizer.move_to(+1)  # (the vectors' z drawn: kept for the step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        optimizer.move_to(-1)
        optimizer.set_projected_grad(0.5)
        optimizer.step()
        torch.cuda.synchronize()
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) < 24, [event.name for event in kernels]


@pytest.mark.parametrize(
    "settings",
    [
        dict(low_rank=True),
        dict(low_rank=True, momentum=0.9),
        {},
        dict(batched_pair=True, queries=2),
        dict(blocked=True),
    ],
    ids=["LOZO", "LOZO-M", "MeZO", "MeZO-pair-q2", "MeZO-blocked"],
)
@torch.no_grad()
def test_a_zo_step_reads_nothing_back_from_the_device(settings, tiny_llama_dir, monkeypatch):
    """Drawing the directions, the forwards at θ±εZ, the update and new V periods never turn a tensor into a
    Python value: on a GPU each such read would stall the step (LOZO asked every matrix whether its update
    was zero at each move). Only a merge, every merge_periods periods, asks whether its factors are. At lr 0
    LOZO's side path stays off. MeZO-blocked: every Linear and Embedding perturbed by blocks of rows, an
    embedding's rows placed as on a GPU (dense_path.place_rows)."""
    settings = dict(settings)
    if settings.pop("blocked", False):
        monkeypatch.setattr(dense_path, "BLOCKED_ABOVE", 0)
        monkeypatch.setattr(dense_path, "GATHERING_DEVICES", {"cuda", "cpu"})
    ids = torch.tensor([[1, 5, 9, 2], [3, 4, 8, 7]])
    for lr in (1e-6, 0.0):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
        names = {id(p): n for n, p in model.named_parameters()}
        options = dict(step_interval=1, merge_periods=8, names=names) | settings  # no merge in 5 steps
        optimizer = ZOOptimizer(model.parameters(), lr=lr, seed=3, **options)
        optimizer.attach(model)
        mode = HostReads()
        with mode:
            for g in (0.9, -1.3, 0.5, 2.0, -0.1):
                optimizer.begin_step()
                if optimizer.pair is None:
                    for position in (+1, -1):
                        optimizer.move_to(position)
                        model(input_ids=ids)
                    optimizer.set_projected_grad(g)
                else:
                    optimizer.move_to(PAIR)
                    model(input_ids=ids.repeat(4, 1))
                    optimizer.set_projected_grad([g, -g])
                optimizer.step()
        assert mode.reads == []
        matrices = optimizer.matrices.values()
        assert all(matrix.active == (lr != 0) and matrix.periods == (4 if lr else 0) for matrix in matrices)
