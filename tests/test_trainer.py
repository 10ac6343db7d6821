"""LOZO, LOZO-M and MeZO on tiny random OPTs and real SST-2: the update is exactly the one that the losses
measured, has the low-rank structure, estimates the gradient, resumes bit for bit."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_lozo
import tasks
from LOZOtrainer import U_STREAM, V_STREAM, ZOOptimizer, stream_seed
from utils import DataCollatorWithPaddingAndNesting, UsageError, model_option_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sst2(data_dir):
    return tasks.get_task("SST2", str(data_dir))


def parse(tiny_opt_dir, tmp_path, *extra):
    return run_lozo.parse_args(
        [
            "--task_name", "SST2",
            "--model_name", str(tiny_opt_dir),
            "--output_dir", str(tmp_path / "out"),
            "--num_train", "16",
            "--train_set_seed", "0",
            "--per_device_train_batch_size", "8",
            "--train_as_classification",
            "--logging_steps", "1",
            "--seed", "7",
            "--lr_scheduler_type", "constant",
            *extra,
        ]
    )  # fmt: skip


def train(framework, sst2, num_train=16):
    train_set = sst2.sample_train_sets(num_train=num_train, seed=0)[0]
    return framework.train(train_set, sst2.valid_samples[:4])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def record_projected_grads(monkeypatch):
    grads = []
    original = ZOOptimizer.set_projected_grad

    def recording(self, g):
        grads.append(g)
        original(self, g)

    monkeypatch.setattr(ZOOptimizer, "set_projected_grad", recording)
    return grads


def regenerate(seed, stream, counter, index, shape):
    generator = torch.Generator().manual_seed(stream_seed(seed, stream, counter, index))
    return torch.randn(shape, generator=generator)


def dense_z(seed, step, index, param):
    return regenerate(seed, U_STREAM, step, index, (param.numel(),)).view(param.shape)


@pytest.mark.parametrize("trainer", ["LOZO", "zo"])
def test_one_step_changes_each_weight_by_exactly_minus_lr_g_z(
    trainer, tiny_opt_dir, sst2, tmp_path, monkeypatch
):
    lr, rank = 0.05, 2
    args = parse(tiny_opt_dir, tmp_path, "--trainer", trainer, "--max_steps", "1", "--learning_rate", str(lr))
    framework = run_lozo.Framework(args, sst2)
    before = snapshot(framework.model)
    grads = record_projected_grads(monkeypatch)
    trainer_ = train(framework, sst2, num_train=8)  # one batch of all 8 samples
    (g,) = grads
    assert math.isfinite(g) and g != 0
    assert g == pytest.approx(independent_projected_grad(trainer_, args, sst2, trainer == "LOZO"), rel=1e-3)
    index_of = {id(p): i for i, p in trainer_.zo_optimizer.tensors}
    low_rank_checked = dense_checked = 0
    for name, p in trainer_.model.named_parameters():
        i = index_of[id(p)]
        if trainer == "LOZO" and p.dim() == 2:
            U = regenerate(7, U_STREAM, 0, i, (p.shape[0], rank))
            V = regenerate(7, V_STREAM, 0, i, (p.shape[1], rank))
            expected = -lr * g * (U @ V.T)
            low_rank_checked += 1
        else:
            expected = -lr * g * dense_z(7, 0, i, p)
            dense_checked += 1
        change = p.detach() - before[name]
        scale = expected.abs().max().item()
        torch.testing.assert_close(change, expected, atol=1e-6 + 1e-4 * scale, rtol=0, msg=name)
    assert dense_checked > 0 and (trainer == "zo" or low_rank_checked > 0)


def independent_projected_grad(trainer, args, sst2, low_rank):
    """(L(θ+εZ) − L(θ−εZ)) / 2ε on the 8 training samples, recomputed on a fresh copy of the model."""
    reference = run_lozo.Framework(args, sst2)
    reference.model.eval()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_name = dict(reference.model.named_parameters())
    ordered = [by_name[names[id(p)]] for _, p in trainer.zo_optimizer.tensors]  # the trainer's tensor order
    optimizer = ZOOptimizer(ordered, lr=0.0, eps=1e-3, seed=7, low_rank=low_rank, rank=2)
    optimizer.attach(reference.model)
    features = reference.training_features(sst2.sample_train_sets(num_train=8, seed=0)[0])
    batch = DataCollatorWithPaddingAndNesting(reference.tokenizer.pad_token_id)(features)
    with torch.no_grad():
        optimizer.begin_step()
        optimizer.move_to(+1)
        loss_plus = zo_loss(reference.model, batch).item()
        optimizer.move_to(-1)
        loss_minus = zo_loss(reference.model, batch).item()
    return (loss_plus - loss_minus) / 2e-3


def test_lr_schedule_reaches_the_update(tiny_opt_dir, sst2, tmp_path, monkeypatch):
    """Linear decay over 2 steps: step 0 uses η, step 1 uses η/2."""
    lr = 0.05
    extra = [
        "--trainer",
        "zo",
        "--max_steps",
        "2",
        "--learning_rate",
        str(lr),
        "--lr_scheduler_type",
        "linear",
    ]
    framework = run_lozo.Framework(parse(tiny_opt_dir, tmp_path, *extra), sst2)
    before = snapshot(framework.model)
    grads = record_projected_grads(monkeypatch)
    trainer = train(framework, sst2)
    index_of = {id(p): i for i, p in trainer.zo_optimizer.tensors}
    for name, p in trainer.model.named_parameters():
        i = index_of[id(p)]
        expected = -lr * grads[0] * dense_z(7, 0, i, p) - lr / 2 * grads[1] * dense_z(7, 1, i, p)
        scale = expected.abs().max().item()
        torch.testing.assert_close(p.detach() - before[name], expected, atol=1e-6 + 1e-4 * scale, rtol=0)


def weight_change_ranks(tiny_opt_dir, sst2, tmp_path, steps, interval, rank=2):
    extra = ["--trainer", "LOZO", "--max_steps", str(steps), "--learning_rate", "0.05"]
    extra += ["--rank_r", str(rank), "--step_interval", str(interval)]
    framework = run_lozo.Framework(parse(tiny_opt_dir, tmp_path, *extra), sst2)
    before = snapshot(framework.model)
    trainer = train(framework, sst2)
    ranks = {}
    for name, p in trainer.model.named_parameters():
        if p.dim() == 2:
            change = (p.detach() - before[name]).double()
            ranks[name] = int(torch.linalg.matrix_rank(change, rtol=1e-4))
    return ranks


def test_change_has_rank_r_within_a_v_period_and_2r_across_one_redraw(tiny_opt_dir, sst2, tmp_path):
    within = weight_change_ranks(tiny_opt_dir, sst2, tmp_path, steps=4, interval=10)
    assert set(within.values()) == {2}, within  # 4 steps, one V: rank r (not 4r)
    across = weight_change_ranks(tiny_opt_dir, sst2, tmp_path, steps=4, interval=2)
    assert set(across.values()) == {4}, across  # V redrawn at step 2: rank 2r


def test_v_is_redrawn_exactly_at_multiples_of_the_interval():
    weight = torch.nn.Parameter(torch.zeros(6, 5))
    optimizer = ZOOptimizer([weight], lr=0.0, eps=1e-3, seed=3, low_rank=True, rank=2, step_interval=3)
    seen = []
    for step in range(8):
        optimizer.begin_step()
        seen.append(optimizer.matrices[0].V.clone())
        torch.testing.assert_close(seen[-1], regenerate(3, V_STREAM, step // 3, 0, (5, 2)), atol=0, rtol=0)
        optimizer.move_to(-1)
        optimizer.set_projected_grad(0.0)
        optimizer.step()
    redrawn = [step for step in range(1, 8) if not torch.equal(seen[step], seen[step - 1])]
    assert redrawn == [3, 6]


def test_update_uses_the_perturbation_direction_on_redraw_steps():
    """On every step, including those that redraw V, the update direction equals the perturbation."""
    weight = torch.nn.Parameter(torch.randn(7, 4, dtype=torch.float64))
    optimizer = ZOOptimizer([weight], lr=0.1, eps=1e-3, seed=5, low_rank=True, rank=2, step_interval=1)
    for _ in range(3):
        start = optimizer.effective_weight(weight)
        optimizer.begin_step()
        optimizer.move_to(+1)
        perturbation = (optimizer.effective_weight(weight) - start) / 1e-3
        optimizer.move_to(-1)
        optimizer.set_projected_grad(2.0)
        optimizer.step()
        change = optimizer.effective_weight(weight) - start
        torch.testing.assert_close(change, -0.1 * 2.0 * perturbation, atol=1e-6, rtol=1e-3)


def test_lozo_m_momentum_follows_the_formulas():
    beta, lr, eps, rank, interval = 0.8, 0.1, 1e-3, 2, 2
    weight = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    optimizer = ZOOptimizer(
        [weight, bias],
        lr=lr,
        eps=eps,
        seed=11,
        low_rank=True,
        rank=rank,
        step_interval=interval,
        momentum=beta,
    )
    grads = [0.5, -1.5, 2.0, 0.25, 1.0]
    N, V_old, m = torch.zeros(6, rank, dtype=torch.float64), None, torch.zeros(6, dtype=torch.float64)
    for step, g in enumerate(grads):
        w0, b0 = optimizer.effective_weight(weight).double(), optimizer.effective_weight(bias).double()
        take_step(optimizer, g)
        U = regenerate(11, U_STREAM, step, 0, (6, rank)).double()
        V = regenerate(11, V_STREAM, step // interval, 0, (5, rank)).double()
        z = regenerate(11, U_STREAM, step, 1, (6,)).double()
        if step == 0:  # the released code's start: N₀ = g₀U₀, m₀ = g₀z₀ (not (1 − β) of them)
            N, m = g * U, g * z
        elif step % interval == 0:
            N = beta * N @ (V_old.T @ V) / 5 + (1 - beta) * g * U
        else:
            N = beta * N + (1 - beta) * g * U
        if step > 0:
            m = beta * m + (1 - beta) * g * z
        V_old = V
        torch.testing.assert_close(optimizer.momentum[0].double(), N, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            optimizer.effective_weight(weight) - w0, -lr * N @ V.T, atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(optimizer.effective_weight(bias) - b0, -lr * m, atol=1e-6, rtol=1e-5)


def take_step(optimizer, g):
    """One ZO step with a given projected gradient (no model: the losses are not needed)."""
    optimizer.begin_step()
    optimizer.move_to(+1)
    optimizer.move_to(-1)
    optimizer.set_projected_grad(g)
    optimizer.step()


@pytest.mark.parametrize("low_rank", [True, False])
def test_weight_decay_applies_to_weights_not_to_biases(low_rank):
    lr, wd, g = 0.1, 0.5, 0.7
    weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    groups = [{"params": [weight], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0}]
    optimizer = ZOOptimizer(groups, lr=lr, eps=1e-3, seed=1, low_rank=low_rank)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    take_step(optimizer, g)
    if low_rank:
        Z = regenerate(1, U_STREAM, 0, 0, (4, 2)) @ regenerate(1, V_STREAM, 0, 0, (3, 2)).T
    else:
        Z = regenerate(1, U_STREAM, 0, 0, (12,)).view(4, 3)
    z = regenerate(1, U_STREAM, 0, 1, (4,))
    expected = (1 - lr * wd) * w0 - lr * g * Z.double()
    torch.testing.assert_close(optimizer.effective_weight(weight).double(), expected, atol=1e-6, rtol=1e-6)
    optimizer.settle()  # written into the weights
    torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bias.detach(), b0 - lr * g * z.double(), atol=1e-6, rtol=1e-6)


def gradient_estimate(model, batch, params, low_rank, samples, eps=1e-4, rank=2):
    """Mean of g·Z over independent seeds, the ZO estimate of the gradient (E = r·∇L for LOZO)."""
    estimate = [torch.zeros_like(p) for p in params]
    for seed in range(samples):
        optimizer = ZOOptimizer(params, lr=0.0, eps=eps, seed=seed, low_rank=low_rank, rank=rank)
        optimizer.attach(model)
        optimizer.begin_step()
        optimizer.move_to(+1)
        loss_plus = zo_loss(model, batch)
        optimizer.move_to(-1)
        loss_minus = zo_loss(model, batch)
        optimizer.release()
        g = (loss_plus - loss_minus).item() / (2 * eps)
        for i, p in enumerate(params):
            if low_rank and p.dim() == 2:
                U = regenerate(seed, U_STREAM, 0, i, (p.shape[0], rank)).double()
                V = regenerate(seed, V_STREAM, 0, i, (p.shape[1], rank)).double()
                estimate[i] += g * (U @ V.T) / samples
            else:
                estimate[i] += g * dense_z(seed, 0, i, p).double() / samples
    return torch.cat([e.flatten() for e in estimate])


def zo_loss(model, batch):
    return model_option_loss(model, batch, 1)


@pytest.mark.parametrize(("low_rank", "expected_scale"), [(False, 1.0), (True, 2.0)])
def test_estimate_points_along_the_autograd_gradient(low_rank, expected_scale, tiny_opt_dir, sst2, tmp_path):
    """With d trainable numbers and K seeds, E‖ĝ − c∇‖² ≈ c²(d + 1)‖∇‖²/K for dense z (c = 1), and about the
    same for U Vᵀ with c = r, so cos(ĝ, ∇) ≈ (1 + (d + 1)/K)^(-1/2): 0.71 for d = 1056, K = 1100. Assert
    > 0.55 (several standard deviations below), and ⟨ĝ, ∇⟩/‖∇‖² ≈ c."""
    framework = run_lozo.Framework(parse(tiny_opt_dir, tmp_path, "--trainer", "zo"), sst2)
    model = framework.model.double().eval()
    layer = model.model.decoder.layers[0]
    params = [layer.fc1.weight, layer.fc2.weight, layer.fc1.bias]  # 512 + 512 + 32 numbers
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    features = framework.training_features(sst2.sample_train_sets(num_train=4, seed=0)[0])
    batch = DataCollatorWithPaddingAndNesting(framework.tokenizer.pad_token_id)(features)
    loss = zo_loss(model, batch)
    gradient = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
    with torch.no_grad():
        estimate = gradient_estimate(model, batch, params, low_rank, samples=1100)
    cosine = torch.nn.functional.cosine_similarity(estimate, gradient, dim=0).item()
    scale = (estimate @ gradient / (gradient @ gradient)).item()
    assert cosine > 0.55, cosine
    assert abs(scale - expected_scale) < 0.25 * expected_scale, scale


def test_gradient_accumulation_equals_the_big_batch(tiny_opt_dir, sst2, tmp_path):
    results = []
    for batch, accumulation in [(8, 1), (4, 2)]:
        extra = ["--trainer", "LOZO", "--max_steps", "2", "--learning_rate", "0.05"]
        extra += [
            "--per_device_train_batch_size",
            str(batch),
            "--gradient_accumulation_steps",
            str(accumulation),
        ]
        framework = run_lozo.Framework(parse(tiny_opt_dir, tmp_path / str(batch), *extra), sst2)
        before = snapshot(framework.model)
        trainer = train(framework, sst2)
        results.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    for name, change in results[0].items():
        scale = change.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(results[1][name], change, atol=1e-4 * scale, rtol=0, msg=name)


def test_non_finite_loss_skips_the_step_and_is_not_logged_as_zero(tiny_opt_dir, sst2, tmp_path, caplog):
    lr = 0.05
    args = parse(tiny_opt_dir, tmp_path, "--trainer", "zo", "--max_steps", "2", "--learning_rate", str(lr))
    framework = run_lozo.Framework(args, sst2)
    calls = {"n": 0}
    original = run_lozo.LowRankTrainer.loss_sum

    def loss_sum(self, model, inputs):
        calls["n"] += 1
        total, count = original(self, model, inputs)
        return (total * float("nan"), count) if calls["n"] == 2 else (total, count)  # L- of step 0

    before = snapshot(framework.model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_lozo.LowRankTrainer, "loss_sum", loss_sum)
        grads = record_projected_grads(patch)
        trainer = train(framework, sst2)
    assert math.isnan(grads[0]) and math.isfinite(grads[1])
    assert trainer.zo_optimizer.skipped == 1
    assert "update skipped (1 skipped so far)" in caplog.text
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["loss"] != 0 for entry in logged)
    assert [entry["zo_skipped_steps"] for entry in logged] == [1, 1]
    # Only step 1 moved the weights: the total change is -lr * g1 * z1.
    index_of = {id(p): i for i, p in trainer.zo_optimizer.tensors}
    for name, p in trainer.model.named_parameters():
        expected = -lr * grads[1] * dense_z(7, 1, index_of[id(p)], p)
        scale = expected.abs().max().item()
        torch.testing.assert_close(p.detach() - before[name], expected, atol=1e-6 + 1e-4 * scale, rtol=0)


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "run_lozo.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "method",
    [
        ["--trainer", "LOZO"],
        ["--trainer", "LOZO", "--lozo_optimizer", "sgdm"],
        ["--trainer", "zo"],
        # A checkpoint at a V redraw: LOZO-M's carry-over into the new V's basis needs the V it replaces.
        ["--trainer", "LOZO", "--lozo_optimizer", "sgdm", "--step_interval", "2"],
    ],
)
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(method, tiny_opt_dir, data_dir, tmp_path):
    common = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--data_dir", str(data_dir),
        "--num_train", "24", "--num_eval", "4", "--train_set_seed", "0", "--per_device_train_batch_size", "4",
        "--learning_rate", "0.01", "--max_steps", "4", "--step_interval", "3", "--train_as_classification",
        "--save_strategy", "steps", "--save_steps", "2", "--no_eval", *method,
    ]  # fmt: skip
    straight = run_lozo.main([*common, "--output_dir", str(tmp_path / "straight")])
    assert straight == 0
    resumed = run_cli(
        *common,
        "--output_dir", str(tmp_path / "resumed"),
        "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-2"),
        cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    c = load_file(tmp_path / "straight" / "checkpoint-2" / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # steps 3-4 changed the weights
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigusr1_saves_a_checkpoint_and_stops(tiny_opt_dir, sst2, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), __import__("signal").SIGUSR1)

    extra = ["--trainer", "LOZO", "--max_steps", "5", "--save_on_interrupt"]
    framework = run_lozo.Framework(parse(tiny_opt_dir, tmp_path, *extra), sst2)
    original = run_lozo.LowRankTrainer.__init__

    def with_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Interrupt())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_lozo.LowRankTrainer, "__init__", with_interrupt)
        trainer = train(framework, sst2)
    assert trainer.state.global_step == 2  # the step running at the signal finished, then it stopped
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()


def test_non_diff_trains_on_minus_f1_of_generated_answers(tiny_opt_dir, data_dir, tmp_path):
    squad = tasks.get_task("SQuAD", str(data_dir))
    args = run_lozo.parse_args(
        [
            "--task_name", "SQuAD", "--model_name", str(tiny_opt_dir), "--output_dir", str(tmp_path / "out"),
            "--trainer", "zo", "--non_diff", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_new_tokens", "4", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--train_set_seed", "0",
        ]
    )  # fmt: skip
    framework = run_lozo.Framework(args, squad)
    features = framework.training_features(squad.samples["train"][:2])
    assert features[0]["gold"] == squad.samples["train"][0].correct_candidate
    assert framework.tokenizer.decode(features[0]["input_ids"]).endswith("Answer:")
    trainer = framework.train(squad.samples["train"][:4], squad.valid_samples[:2])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(-1.0 <= loss <= 0.0 for loss in losses)


def test_resuming_with_other_settings_is_a_usage_error():
    weight = torch.nn.Parameter(torch.randn(6, 5))
    saved = ZOOptimizer([weight], lr=0.1, seed=3, low_rank=True, rank=2)
    take_step(saved, 1.0)
    state = saved.state_dict()
    with pytest.raises(UsageError, match="'rank': \\(2, 3\\)"):
        ZOOptimizer([weight], lr=0.1, seed=3, low_rank=True, rank=3).load_state_dict(state)
    state.pop("zo")
    with pytest.raises(UsageError, match="no zeroth-order state"):
        ZOOptimizer([weight], lr=0.1, seed=3, low_rank=True, rank=2).load_state_dict(state)
    resumed = ZOOptimizer([weight], lr=0.1, seed=3, low_rank=True, rank=2)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.zo_step == 1 and torch.equal(resumed.matrices[0].V, saved.matrices[0].V)


def test_padding_free_training_packs_rows_and_moves_the_weights_alike(tiny_opt_dir, sst2, tmp_path):
    """--padding_free (the default) runs the training forwards on fewer rows than the batch and trains the
    weights as the padded batch does (float32: to rounding); --padding_free False pads every row."""
    results = {}
    in_loss = {"now": False}
    original = run_lozo.LowRankTrainer.loss_sum

    def loss_sum(self, model, inputs):  # marks the training forwards (evaluation runs others)
        in_loss["now"] = True
        try:
            return original(self, model, inputs)
        finally:
            in_loss["now"] = False

    for padding_free in ("True", "False"):
        extra = ["--trainer", "LOZO", "--max_steps", "2", "--learning_rate", "0.05"]
        args = parse(tiny_opt_dir, tmp_path / padding_free, *extra, "--padding_free", padding_free)
        framework = run_lozo.Framework(args, sst2)
        before = snapshot(framework.model)
        rows = []

        def record(_, args, kwargs, rows=rows):
            if in_loss["now"]:
                rows.append(kwargs["input_ids"].shape[0])

        framework.model.register_forward_pre_hook(record, with_kwargs=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(run_lozo.LowRankTrainer, "loss_sum", loss_sum)
            trainer = train(framework, sst2)
        change = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
        results[padding_free] = (rows, change)
    (packed_rows, packed), (padded_rows, padded) = results["True"], results["False"]
    assert padded_rows == [8] * 4  # two steps, two forwards each
    assert len(packed_rows) == 4 and max(packed_rows) < 8
    for name, change in padded.items():
        scale = change.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(packed[name], change, atol=1e-4 * scale, rtol=0, msg=name)
