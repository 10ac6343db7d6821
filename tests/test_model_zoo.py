"""LOZO on many transformers architectures (tests/zoo.py): the side path computes with exactly the effective
weights at θ ± εZ, a settled model computes them alone, and LOZO / LOZO-M runs through run_lozo.py train
and save."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo import ZOO, perturbed_steps, tiny_model

import run_lozo
from zo_optimizer import ZOOptimizer

VOCAB = 49152  # SmolLM2's tokenizer, saved beside every zoo model
IDS = torch.tensor([[2, 100, 2000, 31, 4000, 7, 9], [2, 8, 9, 10, 11, 12, 13]])


def lozo_optimizer(model):
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.3},
        {"params": [p for p in params if p.dim() < 2]},
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = ZOOptimizer(groups, lr=0.02, eps=0.01, seed=2, low_rank=True, step_interval=1,
                            merge_periods=3, names=names)  # fmt: skip
    optimizer.attach(model)
    return optimizer


def effective_copy(model_type, optimizer, model):
    plain = tiny_model(model_type, VOCAB)
    weights = {n: optimizer.effective_weight(p) for n, p in model.named_parameters()}
    plain.load_state_dict(weights, strict=False)
    return plain


def assert_same_logits(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("model_type", list(ZOO))
@torch.no_grad()
def test_the_side_path_computes_with_the_effective_weights(model_type):
    """After steps with V redraws, unmerged periods, a merge and weight decay: at θ+εZ and θ−εZ the hooked
    model's logits equal those of a plain copy holding the effective weights (float32, relative 1e-5), and
    once settled and released the model alone computes the effective weights' logits."""
    model = tiny_model(model_type, VOCAB)
    optimizer = lozo_optimizer(model)
    stacked = [p for p in model.parameters() if p.dim() == 3]
    assert len(optimizer.matrices) == sum(p.shape[0] for p in stacked) + sum(
        p.dim() == 2 for p in model.parameters()
    )  # every 2-D weight and every expert's slice of a stacked one is a LOZO matrix: none falls back to dense
    # The third step's redraw merges periods 0-2; 3 and 4 stay unmerged.
    perturbed_steps(optimizer, model, {"input_ids": IDS}, [0.7, -1.1, 0.4, 2.0, -0.3])
    optimizer.begin_step()
    for position in (+1, -1, 0):
        optimizer.move_to(position)
        assert_same_logits(
            model(input_ids=IDS).logits, effective_copy(model_type, optimizer, model)(input_ids=IDS).logits
        )
    expected = effective_copy(model_type, optimizer, model)(input_ids=IDS).logits
    optimizer.release()
    assert_same_logits(model(input_ids=IDS).logits, expected)


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory, smollm2_dir):
    """Each zoo model saved with SmolLM2's tokenizer, as run_lozo.py loads a model."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    folders = {}

    def folder(model_type):
        if model_type not in folders:
            path = tmp_path_factory.mktemp("zoo") / model_type
            tiny_model(model_type, VOCAB).save_pretrained(path)
            tokenizer.save_pretrained(path)
            folders[model_type] = path
        return folders[model_type]

    return folder


@pytest.mark.parametrize("method", ["LOZO", "LOZO-M"])
@pytest.mark.parametrize("model_type", list(ZOO))
def test_lozo_runs_train_and_save(model_type, method, zoo_dirs, data_dir, tmp_path):
    folder = zoo_dirs(model_type)
    argv = [
        "--task_name", "SST2", "--model_name", str(folder), "--data_dir", str(data_dir),
        "--num_train", "6", "--num_dev", "2", "--num_eval", "2", "--train_set_seed", "0",
        "--per_device_train_batch_size", "2", "--train_as_classification", "--max_steps", "3",
        "--trainer", "LOZO", "--step_interval", "2", "--learning_rate", "1e-2", "--zo_eps", "1e-2",
        "--save_model", "--report_to", "none", "--output_dir", str(tmp_path),
        "--result_file", str(tmp_path / "r.json"),
        *(["--lozo_optimizer", "sgdm"] if method == "LOZO-M" else []),
    ]  # fmt: skip
    assert run_lozo.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] >= 0
    start = load_file(folder / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    changed = [k for k in start if start[k].dim() >= 2 and not torch.equal(start[k], saved[k])]
    assert changed and all(torch.isfinite(saved[k]).all() for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.isfinite(reloaded(input_ids=IDS).logits).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["opt", "gpt2", "falcon", "gemma", "mixtral"])
@torch.no_grad()
def test_on_cuda_the_side_path_in_half_precision_follows_the_effective_weights(model_type, dtype):
    """On a GPU the side term runs in the weights' dtype (float16 with V's columns at unit length): its
    logits at θ+εZ are those of a float32 copy holding the effective weights, to the dtype's rounding."""
    model = tiny_model(model_type, VOCAB).to("cuda", dtype)
    optimizer = lozo_optimizer(model)
    ids = IDS.cuda()
    perturbed_steps(optimizer, model, {"input_ids": ids}, [0.7, -1.1, 0.4, 2.0])
    optimizer.begin_step()
    optimizer.move_to(+1)
    assert all(not m.mirrored and m.left.dtype == dtype for m in optimizer.matrices.values())
    plain = tiny_model(model_type, VOCAB).cuda()
    plain.load_state_dict(
        {n: optimizer.effective_weight(p) for n, p in model.named_parameters()}, strict=False
    )
    actual, expected = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits
    assert torch.isfinite(actual).all()
    assert (actual - expected).norm() <= 0.02 * expected.norm()


@pytest.mark.parametrize("model_type", list(ZOO))
@torch.no_grad()
def test_mezo_perturbs_every_module_of_every_architecture(model_type):
    """MeZO at inference memory on each architecture: at θ±εZ the logits are exactly those of a copy holding
    round(W ± εz), and no weight is written before the update."""
    model = tiny_model(model_type, VOCAB)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-2, seed=4)
    optimizer.attach(model)
    optimizer.begin_step()
    for position in (+1, -1):
        optimizer.move_to(position)
        torch.testing.assert_close(
            model(input_ids=IDS).logits, effective_copy(model_type, optimizer, model)(input_ids=IDS).logits,
            rtol=0, atol=0,
        )  # fmt: skip
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
