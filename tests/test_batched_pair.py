"""--zo_batched_pair: θ+εZ and θ−εZ evaluated as one forward of the batch twice, with the losses, and so the
projected gradient, of the two forwards it replaces; --zo_queries: several directions a step, the update
their average."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import run_lozo
import tasks
from LOZOtrainer import TRAJECTORY_NAME
from tests.zoo import ZOO, tiny_model
from utils import UsageError, model_option_loss, paired
from zo_optimizer import PAIR, ZOOptimizer, dense_noise

IDS = torch.tensor([[2, 100, 2000, 31, 4000, 7], [2, 8, 9, 10, 11, 12]])
METHODS = {
    "LOZO": dict(low_rank=True),
    "LOZO-M": dict(low_rank=True, momentum=0.9),
    "MeZO": dict(),
    "MeZO-master": dict(master_weights=True),
}


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def pair_and_two_passes(model, inputs, **settings):
    """The logits at θ+εZ and θ−εZ of one step (after a first step, so that LOZO's factors hold an update):
    from the batched pair, and from two forwards."""
    optimizer = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-2, seed=5, batched_pair=True, **settings)
    optimizer.attach(model)
    twice = paired(inputs, 2)
    optimizer.begin_step()
    optimizer.move_to(PAIR)
    model(**twice)
    optimizer.set_projected_grad(3.0)
    optimizer.step()
    optimizer.begin_step()
    two_passes = []
    for position in (+1, -1):
        optimizer.move_to(position)
        two_passes.append(model(**inputs).logits)
    optimizer.move_to(PAIR)
    pair = model(**twice).logits.chunk(2)
    optimizer.release()
    return pair, two_passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_pair_computes_both_positions_in_one_forward(family, method, dtype, tiny_opt_dir, tiny_llama_dir):
    """MeZO's halves compute with the same round(W ± εz) copies as two forwards (bit for bit); LOZO's with
    the same factors (float32: to rounding; bf16: its factors' rounding, C and εU rounded apart)."""
    from transformers import AutoModelForCausalLM

    folder = {"opt": tiny_opt_dir, "llama": tiny_llama_dir}[family]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = IDS.clamp(max=model.config.vocab_size - 1)
    (plus, minus), (two_plus, two_minus) = pair_and_two_passes(model, {"input_ids": ids}, **METHODS[method])
    assert relative(plus, minus) > 1e-3  # the two positions compute different functions
    if method.startswith("MeZO"):
        assert torch.equal(plus, two_plus) and torch.equal(minus, two_minus)
    else:
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert relative(plus, two_plus) < tolerance and relative(minus, two_minus) < tolerance


def two_forwards_per_direction(optimizer, forward):
    """forward() at θ+εZ_k and θ−εZ_k of each direction k of the step, one forward each (the pair's order)."""
    results = []
    for query in range(optimizer.queries):
        if query:
            optimizer.begin_query(query)
        for position in (+1, -1):
            optimizer.move_to(position)
            results.append(forward())
    return results


@torch.no_grad()
def stacked_and_passes(model, inputs, queries, **settings):
    """The logits at θ ± εZ_k of every direction k of a step (after a first step, so that LOZO's factors hold
    an update): from one forward of the batch 2q times (the batched pair), and from two forwards per
    direction of a twin model trained alike."""
    twin = copy.deepcopy(model)
    common = dict(lr=1e-2, eps=1e-2, seed=5, queries=queries, **settings)
    stacked = ZOOptimizer(model.parameters(), batched_pair=True, **common)
    passes = ZOOptimizer(twin.parameters(), **common)
    stacked.attach(model), passes.attach(twin)
    grads = [3.0, -1.0, 0.5][:queries]
    for optimizer in (stacked, passes):
        optimizer.begin_step()
        optimizer.set_projected_grad(grads if queries > 1 else grads[0])
        optimizer.step()
        optimizer.begin_step()
    stacked.move_to(PAIR)
    parts = list(model(**paired(inputs, 2 * queries)).logits.chunk(2 * queries))
    two_passes = two_forwards_per_direction(passes, lambda: twin(**inputs).logits)
    stacked.release(), passes.release()
    return parts, two_passes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_pair_evaluates_every_direction_in_one_forward(method, dtype, tiny_llama_dir):
    """--zo_queries 3 with the pair: one forward of the batch 6 times computes, part by part, θ+εZ_k and
    θ−εZ_k of each direction as two forwards per direction do (float64: to 1e-12, exact; float32: 1e-5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    inputs = {"input_ids": IDS.clamp(max=model.config.vocab_size - 1)}
    parts, two_passes = stacked_and_passes(model, inputs, 3, **METHODS[method])
    assert len(parts) == len(two_passes) == 6
    assert min(relative(a, b) for i, a in enumerate(parts) for b in parts[i + 1 :]) > 1e-3  # six functions
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(relative(a, b) for a, b in zip(parts, two_passes, strict=True)) < tolerance


class Scaled(torch.nn.Module):
    """A module owning a trained vector around a child owning its own: a paired owner inside another."""

    def __init__(self, width):
        super().__init__()
        self.scale, self.inner = torch.nn.Parameter(torch.rand(width) + 0.5), torch.nn.Linear(width, width)

    def forward(self, x):
        return self.inner(x) * self.scale


@pytest.mark.parametrize("method", ["LOZO", "MeZO"])
def test_a_paired_owner_inside_another_computes_each_part(method):
    """The child's forward runs inside each part of its parent's: it computes with that part's copies
    (float64: the three directions' six parts as two forwards per direction compute them, to 1e-12)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Scaled(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    twin, x = copy.deepcopy(model), torch.randn(2, 5, 6, dtype=torch.float64)
    common = dict(lr=1e-2, eps=1e-2, seed=3, queries=3, **METHODS[method])
    stacked = ZOOptimizer(model.parameters(), batched_pair=True, **common)
    passes = ZOOptimizer(twin.parameters(), **common)
    stacked.attach(model), passes.attach(twin)
    with torch.no_grad():
        stacked.begin_step(), passes.begin_step()
        stacked.move_to(PAIR)
        parts = model(torch.cat([x] * 6)).chunk(6)
        two_passes = two_forwards_per_direction(passes, lambda: twin(x))
    assert min(relative(a, b) for i, a in enumerate(parts) for b in parts[i + 1 :]) > 1e-3
    assert max(relative(a, b) for a, b in zip(parts, two_passes, strict=True)) < 1e-12


@pytest.mark.parametrize("model_type", list(ZOO))
def test_every_zoo_architecture_pairs_like_two_forwards(model_type):
    """LOZO and MeZO on each architecture of the model zoo (float32), two directions a step: the pair's
    logits are the two forwards' of each direction (relative 1e-5); LOZO on a mixture of experts, whose
    routed tokens the pair cannot split, is refused."""
    inputs = {"input_ids": IDS.clamp(max=99), "attention_mask": torch.ones_like(IDS)}
    for method in ("LOZO", "MeZO"):
        model = tiny_model(model_type, vocab_size=100)
        moe = any(p.dim() == 3 for p in model.parameters())
        if moe and method == "LOZO":
            with pytest.raises(UsageError, match="--zo_batched_pair cannot split a mixture of experts"):
                stacked_and_passes(model, inputs, 2, **METHODS[method])
            continue
        parts, two_passes = stacked_and_passes(model, inputs, 2, **METHODS[method])
        assert max(relative(a, b) for a, b in zip(parts, two_passes, strict=True)) < 1e-5, method


# float32 products of 2B rows and of B rows may block their sums differently (a few units in the last place
# of the loss on an avx512 EPYC: g relative 2e-5 at ε 1e-3; < 1e-5 on an AMX Xeon): float64 shows the pair
# itself exact, float32 that it stays at that rounding.
TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4}  # measured: 1.2e-14 and 2.0e-5 (LOZO)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("method", ["LOZO", "MeZO"])
def test_the_projected_gradient_on_smollm2_and_real_sst2(method, dtype, smollm2_dir, data_dir):
    """SmolLM2-135M on a real SST-2 batch (the training loss, padded and packed as in training), two
    directions: each g from the pair's one forward equals g from two forwards of a twin model, to relative
    1e-11 in float64 and 1e-4 in float32. (MeZO: the embedding and LM head perturbed block by block.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).eval()
    twin = copy.deepcopy(model)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    sentences = [s.data["sentence"] for s in tasks.get_task("SST2", data_dir).samples["train"][:8]]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    eps, pad = 1e-3, tokenizer.pad_token_id
    common = dict(lr=1e-6, eps=eps, seed=1, queries=2, **METHODS[method])
    stacked = ZOOptimizer(model.parameters(), batched_pair=True, **common)
    passes = ZOOptimizer(twin.parameters(), **common)
    stacked.attach(model), passes.attach(twin)
    with torch.no_grad():
        stacked.begin_step(), passes.begin_step()
        two = two_forwards_per_direction(passes, lambda: model_option_loss(twin, batch, pad, pack=True))
        stacked.move_to(PAIR)
        parts = model_option_loss(model, batch, pad, pack=True, copies=4)
    for k in (0, 1):
        pairs = (two[2 * k : 2 * k + 2], parts[2 * k : 2 * k + 2])
        g_two, g_pair = [float(a - b) / (2 * eps) for a, b in pairs]
        assert abs(g_pair - g_two) <= TOLERANCE[dtype] * abs(g_two)


def trained_grads(tiny_opt_dir, data_dir, out, *extra):
    """The projected gradients of a short run through run_lozo.py (as its trajectory checkpoint records them)
    and its trained weights."""
    argv = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "16", "--train_set_seed", "0", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-4", "--zo_eps", "1e-3", "--max_steps", "4",
        "--zo_trajectory_checkpoints", "--save_strategy", "steps", "--save_steps", "4", "--no_eval",
        "--save_model", "--report_to", "none", "--output_dir", str(out), *extra,
    ]  # fmt: skip
    assert run_lozo.main(argv) == 0
    record = json.loads((out / "checkpoint-4" / TRAJECTORY_NAME).read_text())
    (saved,) = out.glob("*.safetensors")  # the model, or the adapter of --lora / --prefix_tuning
    return [g for g, _ in record["steps"]], load_file(saved)


CLASSIFY = ["--train_as_classification"]
MODES = {
    "LOZO": ["--trainer", "LOZO", *CLASSIFY],
    "LOZO-M, 2 micro-batches": [
        "--trainer",
        "LOZO",
        "--lozo_optimizer",
        "sgdm",
        "--gradient_accumulation_steps",
        "2",
        *CLASSIFY,
    ],  # fmt: skip
    "MeZO": ["--trainer", "zo", *CLASSIFY],
    "LOZO on LoRA": ["--trainer", "LOZO", "--lora", *CLASSIFY],
    "MeZO on prefixes": ["--trainer", "zo", "--prefix_tuning", "--num_prefix", "2", *CLASSIFY],
    "LOZO, 2 directions": ["--trainer", "LOZO", "--zo_queries", "2", *CLASSIFY],
    "MeZO, 2 directions, 2 micro-batches": [
        "--trainer",
        "zo",
        "--zo_queries",
        "2",
        "--gradient_accumulation_steps",
        "2",
        *CLASSIFY,
    ],  # fmt: skip
    "MeZO on minus F1 (generated answers)": [
        "--task_name",
        "SQuAD",
        "--trainer",
        "zo",
        "--non_diff",
        "--max_new_tokens",
        "3",
        "--max_length",
        "120",
    ],  # fmt: skip
}


@pytest.mark.parametrize("mode", list(MODES))
def test_training_with_the_pair_takes_the_two_pass_steps(mode, tiny_opt_dir, data_dir, tmp_path):
    """Through run_lozo.py (float32): every step's g, and so the trained weights, as with two forwards.
    (Generation runs the batch twice too: the tiny random model's answers score F1 0 at both positions.)"""
    two_grads, two_weights = trained_grads(tiny_opt_dir, data_dir, tmp_path / "two", *MODES[mode])
    grads, weights = trained_grads(
        tiny_opt_dir, data_dir, tmp_path / "pair", *MODES[mode], "--zo_batched_pair"
    )
    flat = torch.tensor(grads, dtype=torch.float64).flatten()
    two_flat = torch.tensor(two_grads, dtype=torch.float64).flatten()
    assert len(flat) == 4 * (2 if "2 directions" in mode else 1)
    assert "F1" in mode or flat.abs().min() > 0  # (a random tiny model's answers score 0 at both positions)
    # The losses are float32 sums over 4 items (about 2.8): a unit in their last place is 3e-5 of g at ε 1e-3,
    # and products of 2qB and B rows sum in other orders (float64 shows the pair exact: tests above).
    assert torch.allclose(flat, two_flat, rtol=1e-4, atol=1e-4)
    assert weights.keys() == two_weights.keys()
    # A weight that starts at zero (LoRA's B) is its updates alone: its relative error is the g's, each
    # within 1e-4 of g but more of a small one (measured 1.2e-4 with one thread); a wrong pair is off by O(1).
    for name, weight in weights.items():
        assert torch.equal(weight, two_weights[name]) or relative(weight, two_weights[name]) < 1e-3, name


@torch.no_grad()
def test_several_directions_average_their_updates():
    """--zo_queries q: direction 0 is a one-direction run's, each other has its own stream, and the update is
    the average of g_k·Z_k: LOZO's C = −η·mean(g_k·U_k) under the period's V, MeZO's W − η·mean(g_k·z_k)."""
    torch.manual_seed(0)
    matrix, vector = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(8))
    grads, lr = [2.0, -1.0, 0.5], 0.1
    single = ZOOptimizer([matrix, vector], lr=lr, seed=7, low_rank=True)
    single.begin_step()
    first_U = single.matrices[0].U.clone()

    optimizer = ZOOptimizer([matrix, vector], lr=lr, seed=7, low_rank=True, queries=3)
    optimizer.begin_step()
    Us, zs = [], []
    for k in range(3):
        if k:
            optimizer.begin_query(k)
        Us.append(optimizer.matrices[0].U.clone())
        zs.append(torch.cat([z.clone() for _, z in dense_noise(8, optimizer._seed(1), "cpu")]))
    assert torch.equal(Us[0], first_U)
    assert not torch.equal(Us[1], Us[0]) and not torch.equal(zs[2], zs[1])
    start = vector.detach().clone()
    optimizer.set_projected_grad(grads)
    optimizer.step()
    C = optimizer.matrices[0].C
    expected = -lr * sum(g * U for g, U in zip(grads, Us, strict=True)) / 3
    assert torch.allclose(C, expected, rtol=1e-6, atol=1e-9)
    expected_vector = start - lr * sum(g * z for g, z in zip(grads, zs, strict=True)) / 3
    assert torch.allclose(vector, expected_vector, rtol=1e-6, atol=1e-9)
    paired_optimizer = ZOOptimizer(
        [matrix, vector], lr=lr, seed=7, low_rank=True, queries=3, batched_pair=True
    )
    paired_optimizer.begin_step()  # draws every direction's U; begin_query (two forwards) picks one of them
    for k in (1, 2):
        paired_optimizer.begin_query(k)
        assert torch.equal(paired_optimizer.matrices[0].U, Us[k])
    with pytest.raises(RuntimeError, match="needs 3 projected gradients"):
        optimizer.begin_step()
        optimizer.set_projected_grad(1.0)
        optimizer.step()
