"""Half precision that trains like float32: no drift at learning rate 0 in any dtype (through evaluation,
checkpoints, merges and resume), the low-rank side path computes with exactly the effective weights,
merges round once and without bias, and updates at the papers' learning rates survive bf16 and fp16."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import run_lozo
import side_path
import zo_optimizer
from LOZOtrainer import ZOOptimizer, stochastic_round
from utils import Float32Products, UsageError

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_FLAGS = {"bfloat16": ["--load_bfloat16"], "float16": ["--load_float16"], "float32": []}
METHODS = {
    "LOZO": ["--trainer", "LOZO"],
    "LOZO-M": ["--trainer", "LOZO", "--lozo_optimizer", "sgdm"],
    "MeZO": ["--trainer", "zo"],
    "MeZO-master": ["--trainer", "zo", "--zo_master_weights"],
    "MeZO-compensated": ["--trainer", "zo", "--zo_compensated"],
    # the batched pair (one forward of the batch twice) and several directions a step
    "LOZO-pair-q2": ["--trainer", "LOZO", "--zo_batched_pair", "--zo_queries", "2"],
    "MeZO-pair": ["--trainer", "zo", "--zo_batched_pair"],
}


def run(tiny_opt_dir, data_dir, out, *extra):
    argv = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "24", "--num_dev", "4", "--num_eval", "4", "--train_set_seed", "0",
        "--per_device_train_batch_size", "4", "--train_as_classification", "--max_steps", "12",
        "--step_interval", "2", "--merge_periods", "2", "--lr_scheduler_type", "constant",
        "--eval_strategy", "steps", "--eval_steps", "5", "--save_strategy", "steps", "--save_steps", "4",
        "--save_model", "--report_to", "none", "--output_dir", str(out), "--result_file", str(out / "r.json"),
        *extra,
    ]  # fmt: skip
    assert run_lozo.main(argv) == 0


def initial_weights(tiny_opt_dir, dtype):
    return AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).state_dict()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_learning_rate_0_leaves_every_weight_bit_identical(method, dtype, tiny_opt_dir, data_dir, tmp_path):
    """12 steps, V redrawn every 2 and merged every 2 periods, evaluation every 5 steps and a checkpoint every
    4, then a resume from the step-8 checkpoint: every saved weight is the loaded one, bit for bit, in the
    dtype it was loaded in. (In place, bf16 weights move by ~4 % in 300 steps: see the next test.)"""
    extra = [*METHODS[method], *DTYPE_FLAGS[dtype], "--learning_rate", "0"]
    run(tiny_opt_dir, data_dir, tmp_path / "straight", *extra)
    run(tiny_opt_dir, data_dir, tmp_path / "resumed", *extra, "--resume_from_checkpoint",
        str(tmp_path / "straight" / "checkpoint-8"))  # fmt: skip
    start = initial_weights(tiny_opt_dir, DTYPES[dtype])
    saved = {
        "final": tmp_path / "straight" / "model.safetensors",
        "resumed": tmp_path / "resumed" / "model.safetensors",
        **{
            f"checkpoint-{n}": tmp_path / "straight" / f"checkpoint-{n}" / "model.safetensors"
            for n in (4, 8, 12)
        },
    }
    for label, path in saved.items():
        weights = load_file(path)
        assert weights and all(weights[name].dtype == DTYPES[dtype] for name in weights), label
        for name, weight in weights.items():
            assert torch.equal(weight, start[name]), (label, name)


def test_mezo_in_place_is_the_drifting_arithmetic(tiny_opt_dir, data_dir, tmp_path):
    """--zo_in_place writes θ ± εz into the bf16 weights: at lr 0 they no longer come back exactly."""
    run(
        tiny_opt_dir,
        data_dir,
        tmp_path,
        "--trainer",
        "zo",
        "--zo_in_place",
        "--load_bfloat16",
        "--learning_rate",
        "0",
    )
    start = initial_weights(tiny_opt_dir, torch.bfloat16)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(weights[name], start[name]) for name in weights)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_the_side_path_computes_with_the_effective_weights(family, tiny_opt_dir, tiny_llama_dir, data_dir):
    """After steps with V redraws, unmerged periods, a merge and weight decay, and at θ + εZ: the hooked
    model's logits equal those of a plain copy holding the effective weights. Covers linear layers with and
    without bias, token and OPT's learned position embeddings, and a tied LM head (OPT)."""
    folder = {"opt": tiny_opt_dir, "llama": tiny_llama_dir}[family]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.3},
        {"params": [p for p in params if p.dim() < 2]},
    ]
    optimizer = ZOOptimizer(
        groups, lr=0.05, eps=0.01, seed=2, low_rank=True, step_interval=1, merge_periods=3
    )
    optimizer.attach(model)
    for g in [0.7, -1.1, 0.4, 2.0, -0.3]:  # the third step's redraw merges periods 0-2; 3 and 4 stay unmerged
        optimizer.begin_step()
        optimizer.move_to(+1)
        optimizer.move_to(-1)
        optimizer.set_projected_grad(g)
        optimizer.step()
    matrices = list(optimizer.matrices.values())
    assert {m.periods for m in matrices} == {1} and all(m.scale != 1.0 for m in matrices)
    optimizer.begin_step()
    optimizer.move_to(+1)
    ids = torch.tensor([[2, 100, 2000, 31, 4000, 7], [2, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        plain.load_state_dict(
            {n: optimizer.effective_weight(p) for n, p in model.named_parameters()}, strict=False
        )
        if (
            family == "opt"
        ):  # tied: the plain copy's head is its embedding, which now holds the effective weights
            assert plain.lm_head.weight is plain.model.decoder.embed_tokens.weight
        torch.testing.assert_close(
            model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-10, rtol=1e-10
        )


@pytest.mark.parametrize(
    "read, reader",
    [
        (lambda W, x: x @ torch.cat([W]).T, "cat"),  # W inside a list: the refusal looks into it
        (lambda W, x: x @ W.exp().T, "exp"),
        (lambda W, x: F.linear(x, W * 2), "mul"),
    ],
)
def test_a_matrix_read_other_than_by_linear_or_embedding_is_refused(read, reader):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return read(self.weight, x)

    model = torch.nn.Sequential(Odd())
    optimizer = ZOOptimizer(
        model.parameters(), lr=0.1, low_rank=True, names={id(model[0].weight): "0.weight"}
    )
    optimizer.attach(model)
    optimizer.begin_step()
    optimizer.move_to(+1)
    with pytest.raises(UsageError, match=rf"cannot train 0\.weight: Odd reads it with {reader}\b"):
        model(torch.randn(2, 4))


def take_steps(optimizer, grads):
    for g in grads:
        optimizer.begin_step()
        optimizer.move_to(+1)
        optimizer.move_to(-1)
        optimizer.set_projected_grad(g)
        optimizer.step()


def within_one_neighbour(weights, exact):
    """Whether each weight is exact rounded to one of its two neighbours: closer than the gap from the weight
    to its next representable value on exact's side."""
    toward = torch.where(exact > weights.float(), torch.inf, -torch.inf).to(weights.dtype)
    gap = (torch.nextafter(weights, toward).float() - weights.float()).abs()
    return bool(((weights.float() - exact).abs() < gap).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merges_happen_every_merge_periods_and_round_once(dtype):
    """The weights themselves change only when merge_periods finished periods are written into them (at the
    redraw that finishes the last of them) and at settle; a merge moves the weight the model computes with
    by less than a unit in the last place of each weight."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter((0.2 * torch.randn(64, 48)).to(dtype))
    optimizer = ZOOptimizer(
        [weight], lr=1e-3, eps=1e-3, seed=1, low_rank=True, step_interval=2, merge_periods=3
    )
    stored, merged_at = weight.detach().clone(), []
    for step in range(16):
        before = optimizer.effective_weight(weight)
        optimizer.begin_step()
        if not torch.equal(weight.detach(), stored):
            merged_at.append(step)
            assert within_one_neighbour(weight.detach(), before)
            # Right after a redraw nothing is unmerged: the model computes with the weights themselves.
            assert torch.equal(optimizer.effective_weight(weight), weight.detach().float())
            stored = weight.detach().clone()
        optimizer.move_to(+1)
        optimizer.move_to(-1)
        optimizer.set_projected_grad(5.0 if step % 3 else -3.0)
        optimizer.step()
        assert torch.equal(weight.detach(), stored)  # a step itself never writes the weights
    assert merged_at == [6, 12]  # periods 0-2 and 3-5
    assert optimizer.matrices[0].periods == 1  # period 6 (steps 12-13); period 7 is the current one
    before = optimizer.effective_weight(weight)
    optimizer.settle()
    assert optimizer.matrices[0].periods == 0 and not torch.equal(weight.detach(), stored)
    assert within_one_neighbour(weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    grid = torch.linspace(0.5, 0.75, 64).to(dtype)  # exactly representable
    spacing = torch.nextafter(grid, torch.full_like(grid, 1.0)).float() - grid.float()
    values = grid.float() + torch.rand(64, generator=torch.Generator().manual_seed(0)) * spacing
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([stochastic_round(values, dtype, generator).float() for _ in range(4000)])
    assert ((draws == grid.float()) | (draws == grid.float() + spacing)).all()  # only the two neighbours
    # The mean of 4000 Bernoulli draws is within 5 standard errors (≤ 0.5/√4000 of the spacing) of the value.
    assert ((draws.mean(0) - values).abs() < 5 * 0.5 / 4000**0.5 * spacing).all()


def test_float16_stochastic_rounding_is_unbiased_among_subnormals():
    # fp16's subnormals are evenly spaced by 2⁻²⁴ below 2⁻¹⁴ (its smallest normal), unlike float32's numbers:
    # values there, under the smallest subnormal, on the grid, of both signs, and zero.
    spacing = 2.0**-24
    uniform = torch.rand(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    anywhere = (uniform * 2 - 1) * 2.0**-14  # in (−2⁻¹⁴, 2⁻¹⁴)
    special = torch.tensor([0.3, -0.7, 0.0, 1.0, -3.0, 1023.5, 1023.9]) * spacing  # tiny, zero, on grid, top
    values = torch.cat([anywhere, special]).float()
    below = torch.floor(values.double() / spacing) * spacing
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([stochastic_round(values, torch.float16, generator).double() for _ in range(4000)])
    assert ((draws == below) | (draws == below + spacing)).all()  # only the two neighbours
    on_grid = values.double() == below
    assert (draws[:, on_grid] == values[on_grid].double()).all()  # exact values stay
    assert ((draws.mean(0) - values.double()).abs() < 5 * 0.5 / 4000**0.5 * spacing).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_tensors_round_together_as_each_alone(dtype):
    """MeZO's update rounds a batch of tensors (norms, biases, small matrices) in one buffer (`float_copies`,
    `round_all_into`): each tensor gets the bits it gets rounded alone, with its own generator, whatever its
    size; fp16's subnormals included."""
    sizes = [(5,), (16,), (3, 7), (1,), (64,)]
    torch.manual_seed(0)
    values = [torch.randn(size) * 2.0 ** torch.randint(-20, 2, size).float() for size in sizes]
    alone = [torch.empty(size, dtype=dtype) for size in sizes]
    for out, v, seed in zip(alone, values, range(len(sizes)), strict=True):
        side_path.round_into(out, v.clone(), torch.Generator().manual_seed(seed))
    together = [torch.empty(size, dtype=dtype) for size in sizes]
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(sizes))]
    side_path.round_all_into(together, side_path.float_copies(values), generators)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    nearest = [v.to(dtype) for v in values]  # (the bits were drawn: some values rounded away from nearest)
    assert any(not torch.equal(a, n) for a, n in zip(alone, nearest, strict=True))


def replay(weights, dtype, lr, steps, **settings):
    params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in weights]
    start = [p.detach().float().clone() for p in params]
    grads = json.loads((REPO / "docs" / "half_precision" / "projected_grads.json").read_text())[
        "projected_grads"
    ]
    optimizer = ZOOptimizer(params, lr=lr, eps=1e-3, seed=0, **(dict(low_rank=True) | settings))
    take_steps(optimizer, [grads[step % len(grads)] for step in range(steps)])
    return [optimizer.effective_weight(p) - s for p, s in zip(params, start, strict=True)]


def relative_error(change, reference):
    num = sum(((a - b).double() ** 2).sum() for a, b in zip(change, reference, strict=True))
    return (num / sum((b.double() ** 2).sum() for b in reference)).sqrt().item()


@pytest.fixture(scope="module")
def smollm2_layer(smollm2_dir):
    """Real SmolLM2 weights: layer 0's query and up projections and its first norm."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    layer = model.model.layers[0]
    return [
        w.detach().clone()
        for w in (layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight, layer.input_layernorm.weight)
    ]


def kept_fraction(change, reference):
    """How much of the float32 update the change contains: ⟨ΔW, ΔW_float32⟩ / ‖ΔW_float32‖²."""
    dot = sum((a.double() * b.double()).sum() for a, b in zip(change, reference, strict=True))
    return (dot / sum((b.double() ** 2).sum() for b in reference)).item()


@pytest.mark.parametrize(("dtype", "lr"), [(torch.bfloat16, 1e-6), (torch.float16, 1e-7)])
def test_updates_at_the_papers_learning_rates_track_float32(dtype, lr, smollm2_layer):
    """Real weights, the recorded real projected gradients (|g| ≈ 19), 1,000 LOZO steps with the defaults
    (ν = 50, merged every 8 periods: two merges): ‖ΔW − ΔW_float32‖ / ‖ΔW_float32‖ < 0.75 (measured 0.54 and
    0.65; a step changes a weight by ~1/30 of a unit in its last place), and all of the update is kept."""
    reference = replay(smollm2_layer, torch.float32, lr, 1000)
    change = replay(smollm2_layer, dtype, lr, 1000)
    assert relative_error(change, reference) < 0.75
    assert 0.97 < kept_fraction(change, reference) < 1.03


def test_stochastic_merges_keep_updates_that_rounding_to_nearest_drops(smollm2_layer, monkeypatch):
    """bf16 at lr 1e-7: 1,000 steps move a weight by ~1/10 of its last bit between merges. Stochastic
    rounding keeps the whole update in expectation; rounding to nearest would drop most of it (measured:
    41 % kept)."""
    reference = replay(smollm2_layer, torch.float32, 1e-7, 1000)
    assert 0.95 < kept_fraction(replay(smollm2_layer, torch.bfloat16, 1e-7, 1000), reference) < 1.05
    monkeypatch.setattr(side_path, "round_into", lambda out, values, generator: out.copy_(values))
    assert kept_fraction(replay(smollm2_layer, torch.bfloat16, 1e-7, 1000), reference) < 0.6


@pytest.mark.parametrize("lr", [1e-6, 1e-7])
def test_mezo_compensated_updates_carry_what_rounding_leaves_out(lr, smollm2_layer):
    """MeZO in bf16, 300 steps of the recorded gradients on real weights. Stochastic rounding keeps the
    update in expectation with rounding noise several times its size (measured 4.1x at 1e-6, 13x at 1e-7);
    a compensation buffer rounds to nearest and carries the rest: the weights lag the float32 update by at
    most half a unit in their last place (error 0.56, 0.95), and weights + buffer hold it to 1-2 %."""
    reference = replay(smollm2_layer, torch.float32, lr, 300, low_rank=False)
    stochastic = replay(smollm2_layer, torch.bfloat16, lr, 300, low_rank=False)
    params = [torch.nn.Parameter(w.to(torch.bfloat16, copy=True)) for w in smollm2_layer]
    start = [p.detach().float().clone() for p in params]
    optimizer = ZOOptimizer(params, lr=lr, eps=1e-3, seed=0, compensated=True)
    grads = json.loads((REPO / "docs" / "half_precision" / "projected_grads.json").read_text())
    take_steps(optimizer, [grads["projected_grads"][step % 100] for step in range(300)])
    weights = [p.detach().float() - s for p, s in zip(params, start, strict=True)]
    carried = [w + optimizer.compensation[i].float() for i, w in enumerate(weights)]
    assert relative_error(weights, reference) < 0.25 * relative_error(stochastic, reference)
    assert relative_error(carried, reference) < 0.05
    assert 0.98 < kept_fraction(carried, reference) < 1.02
    assert all(c.dtype == torch.bfloat16 for c in optimizer.compensation.values())  # +2 bytes a weight


# ---- on a GPU (bench/gpu_check.sh runs these with `-m cuda`; they skip without CUDA) ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_on_cuda_learning_rate_0_leaves_every_weight_bit_identical(
    method, dtype, tiny_opt_dir, data_dir, tmp_path
):
    test_learning_rate_0_leaves_every_weight_bit_identical(method, dtype, tiny_opt_dir, data_dir, tmp_path)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_the_side_path_and_merges_match_the_effective_weights(dtype):
    """A CUDA Linear in half precision: hooked output = output with the effective weight (to the dtype's
    rounding of the output), merges within one neighbour, stochastic rounding unbiased on the GPU."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 192, device="cuda", dtype=dtype)
    optimizer = ZOOptimizer(
        [layer.weight], lr=1e-3, eps=1e-3, low_rank=True, step_interval=1, merge_periods=2
    )
    optimizer.attach(layer)
    for g in [1.0, -2.0, 0.5]:
        take_steps(optimizer, [g])
    x = torch.randn(32, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = torch.nn.functional.linear(
            x.float(), optimizer.effective_weight(layer.weight), layer.bias.float()
        )
        torch.testing.assert_close(layer(x).float(), expected, atol=2e-2, rtol=2e-2)
    before = optimizer.effective_weight(layer.weight)
    optimizer.settle()
    assert within_one_neighbour(layer.weight.detach(), before)
    half = torch.tensor(0.5, dtype=dtype, device="cuda")
    gap = (torch.nextafter(half, torch.ones_like(half)) - half).float()
    values = torch.full((4096,), 0.5, device="cuda") + 0.3 * gap  # 30 % of the way to the next value
    rounded = stochastic_round(values, dtype, torch.Generator(device="cuda").manual_seed(0)).float()
    assert abs((rounded > 0.5).float().mean().item() - 0.3) < 0.05  # 7 standard errors


# ---------------------------------------------------------------------------------------------------------
# Half-precision products on CPUs without half matrix instructions


def ulps(a, b, dtype):
    """|a − b| in units of the last place of `dtype` at b's magnitude, or at its root mean square where b is
    smaller (near zero, sums that cancel differ by more units of their own tiny last place)."""
    magnitude = b.float().abs().clamp_min(b.float().square().mean().sqrt())
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return (a.float() - b.float()).abs() / spacing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_products_are_a_float32_product_rounded_once(dtype):
    """What a half matrix unit computes: the exact float32 product of the half inputs, rounded to half once.
    PyTorch's own CPU half product agrees on over 99 % of entries and elsewhere by one or two units in the
    last place at the outputs' scale (its sums run in another order).
    Float32 products and other functions pass through untouched."""
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in [(4, 32, 576), (1536, 576), (1536,)])
    x, w, b = x.to(dtype), (w / 24).to(dtype), b.to(dtype)
    with Float32Products():
        out = F.linear(x, w, b)
        out_no_bias = F.linear(x, weight=w)
        float32_out = F.linear(x.float(), w.float())
        other = torch.tanh(x)
    assert out.dtype == dtype
    assert torch.equal(out, F.linear(x.float(), w.float(), b.float()).to(dtype))
    assert torch.equal(out_no_bias, F.linear(x.float(), w.float()).to(dtype))
    assert torch.equal(float32_out, F.linear(x.float(), w.float())) and torch.equal(other, torch.tanh(x))
    native = F.linear(x, w)  # without a bias, which it may add after rounding the product
    assert (out_no_bias != native).float().mean() < 0.01 and ulps(out_no_bias, native, dtype).max() <= 2


def test_float32_products_under_autocast_round_inputs_as_autocast_does():
    """First-order fine-tuning with --bf16 (float32 weights, CPU autocast): inputs rounded to bf16, product
    in float32, output rounded to bf16, as autocast's own product; gradients reach the float32 weights."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator)
    weights = [weight.clone().requires_grad_() for _ in range(2)]
    outputs = []
    for weight, mode in zip(weights, [Float32Products(), contextlib.nullcontext()], strict=True):
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(F.linear(x, weight))
        outputs[-1].float().square().sum().backward()
    emulated, native = outputs
    assert emulated.dtype == native.dtype == torch.bfloat16
    rounded = [t.detach().bfloat16().float() for t in (x, weights[0])]
    assert torch.equal(emulated, F.linear(*rounded).bfloat16())
    assert ulps(emulated, native, torch.bfloat16).max() <= 1
    torch.testing.assert_close(weights[0].grad, weights[1].grad, rtol=0.02, atol=0.02)


def test_float32_products_compose_with_the_side_path(tiny_llama_dir, monkeypatch):
    """LOZO's side path (a mode of its own, entered by hooks) hands every F.linear on to the products mode: a
    bf16 model at θ + εZ makes all its linear products in float32 and gets PyTorch's own logits to bf16
    accuracy, far closer to each other than to θ's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[2, 100, 2000, 31, 4000, 7], [2, 8, 9, 10, 11, 12]])
    seen, products = [], Float32Products.__torch_function__
    monkeypatch.setattr(
        Float32Products,
        "__torch_function__",
        lambda self, func, types, args=(), kwargs=None: (
            seen.append((func, args)) or products(self, func, types, args, kwargs)
        ),
    )
    with torch.no_grad():
        start = model(input_ids=ids).logits.float()
        groups = [{"params": [p for p in model.parameters() if p.dim() == 2]}]
        optimizer = ZOOptimizer(groups, lr=0.05, eps=0.05, seed=3, low_rank=True, step_interval=1)
        optimizer.attach(model)
        optimizer.begin_step()
        optimizer.move_to(+1)
        with Float32Products():
            emulated = model(input_ids=ids).logits.float()
        native = model(input_ids=ids).logits.float()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # Every Linear's product reaches the products mode in bf16 (the side term's thin float32 products too).
    assert sum(f is F.linear and a[1].dtype == torch.bfloat16 for f, a in seen) == linears > 0
    moved, disagreement = (native - start).abs().max(), (emulated - native).abs().max()
    assert moved > 0.5 and disagreement < 0.05 * moved, (moved, disagreement)


@pytest.mark.parametrize("lr", [1e-6, 1e-7])
def test_mezo_updates_in_bf16_keep_the_update_in_expectation(lr, smollm2_layer, monkeypatch):
    """MeZO at inference memory: a bf16 weight takes each step's update θ − ηgz rounded once, stochastically.
    A step moves a weight by ~1/20 (lr 1e-6) or ~1/200 (1e-7) of its last bit: over 300 steps all of the
    float32 update is kept in expectation (measured 1.002 and 1.010), where rounding to nearest keeps 21 % and
    2 % of it."""
    reference = replay(smollm2_layer, torch.float32, lr, 300, low_rank=False)
    change = replay(smollm2_layer, torch.bfloat16, lr, 300, low_rank=False)
    assert 0.9 < kept_fraction(change, reference) < 1.1
    nearest_all = lambda outs, copies, generators: torch._foreach_copy_(outs, copies)  # noqa: E731
    monkeypatch.setattr(zo_optimizer, "round_all_into", nearest_all)
    nearest = kept_fraction(replay(smollm2_layer, torch.bfloat16, lr, 300, low_rank=False), reference)
    assert nearest < 0.5
