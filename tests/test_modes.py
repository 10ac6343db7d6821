"""Parameter-efficient modes (LoRA, prefix tuning, head tuning, linear probing) on tiny random OPT and
Llama models and real SST-2: each trains exactly the parameters it should, with every trainer."""

import json
import os

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import run_lozo
import tasks
from tuning_modes import random_token_ids
from utils import read_result

TRAINERS = {
    "regular": ["--trainer", "regular"],
    "zo": ["--trainer", "zo"],
    "LOZO": ["--trainer", "LOZO"],
    "LOZO-M": ["--trainer", "LOZO", "--lozo_optimizer", "sgdm"],
}
MODES = {  # flags, and how to recognise the parameters the mode trains
    "lora": (["--lora"], lambda name: "lora_" in name),
    "prefix": (["--prefix_tuning"], lambda name: "prompt_encoder" in name),
    "head": (["--head_tuning"], None),  # the LM head: checked by identity below
}


@pytest.fixture(scope="module")
def sst2(data_dir):
    return tasks.get_task("SST2", str(data_dir))


@pytest.fixture(scope="module")
def models(tiny_opt_dir, tiny_llama_dir):
    return {"opt": tiny_opt_dir, "llama": tiny_llama_dir}


def make_framework(model_dir, sst2, tmp_path, *extra):
    args = run_lozo.parse_args(
        [
            "--task_name", "SST2",
            "--model_name", str(model_dir),
            "--output_dir", str(tmp_path / "out"),
            "--num_train", "16",
            "--train_set_seed", "0",
            "--per_device_train_batch_size", "8",
            "--seed", "3",
            "--lr_scheduler_type", "constant",
            "--report_to", "none",
            *extra,
        ]
        + (["--train_as_classification"] if "--trainer" in extra else [])
    )  # fmt: skip
    return run_lozo.Framework(args, sst2)


def train(framework, sst2, steps=2):
    framework.args.max_steps = steps
    train_set = sst2.sample_train_sets(num_train=16, seed=0)[0]
    framework.train(train_set, sst2.valid_samples[:4])


def snapshot(model):
    return {name: (param.detach().clone(), param.requires_grad) for name, param in model.named_parameters()}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_only_its_parameters(mode, trainer, family, models, sst2, tmp_path):
    flags, is_intended = MODES[mode]
    framework = make_framework(
        models[family], sst2, tmp_path, *flags, *TRAINERS[trainer], "--learning_rate", "1e-2"
    )
    model = framework.model
    if mode == "head":
        head = model.get_output_embeddings().weight
        intended = {name for name, param in model.named_parameters() if param is head}
    else:
        intended = {name for name, _ in model.named_parameters() if is_intended(name)}
    before = snapshot(model)
    assert {name for name, (_, trainable) in before.items() if trainable} == intended
    assert intended
    train(framework, sst2)
    for name, param in model.named_parameters():
        if name in intended:
            assert not torch.equal(param, before[name][0]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name][0]), f"frozen {name} changed"


def test_lora_starts_from_the_adapter_its_seed_gives(tiny_opt_dir, sst2, tmp_path):
    """LoRA's initial factors are drawn from torch's global generator: --seed fixes them, whatever was drawn
    before in the process (two runs with one seed train the same adapter; another seed, another one)."""

    def initial_adapter(seed):
        torch.rand(7)  # the global generator, moved as an earlier run in the process would have
        framework = make_framework(
            tiny_opt_dir, sst2, tmp_path, "--lora", "--trainer", "zo", "--seed", str(seed)
        )
        return {
            name: p.detach().clone() for name, p in framework.model.named_parameters() if "lora_A" in name
        }

    first, again, other = initial_adapter(3), initial_adapter(3), initial_adapter(4)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def test_lozo_on_lora_matrices_changes_each_by_rank_at_most_r(tiny_opt_dir, sst2, tmp_path):
    framework = make_framework(
        tiny_opt_dir,
        sst2,
        tmp_path,
        "--lora",
        "--trainer",
        "LOZO",
        "--rank_r",
        "2",
        "--learning_rate",
        "1e-1",
    )
    lora = {n: p.detach().clone() for n, p in framework.model.named_parameters() if "lora_" in n}
    train(framework, sst2, steps=4)  # within one V period (ν = 50)
    ranks = {}
    for name, param in framework.model.named_parameters():
        if name in lora:
            assert min(param.shape) == 8  # a rank ≤ 2 change is a real constraint on an 8-row/column matrix
            ranks[name] = torch.linalg.matrix_rank((param.detach() - lora[name]).double(), rtol=1e-6).item()
    assert max(ranks.values()) == 2, ranks  # not 0: every matrix moved; not above r = 2


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefixes_start_as_the_real_activations_of_random_tokens(family, models, sst2, tmp_path):
    framework = make_framework(
        models[family], sst2, tmp_path, "--prefix_tuning", "--num_prefix", "4", "--trainer", "zo"
    )
    model = framework.model
    tokens = random_token_ids(model.config.vocab_size, 4, seed=3)
    text = torch.tensor([framework.tokenizer.encode("a fine, moving film")])
    with torch.no_grad():
        prefixed = model(input_ids=text, attention_mask=torch.ones_like(text)).logits
        with model.disable_adapter():
            plain = model(input_ids=torch.cat([tokens[None], text], 1)).logits[:, len(tokens) :]
    # The prefixed model reads `text` exactly as the plain model reads it after those tokens.
    torch.testing.assert_close(prefixed, plain, atol=1e-5, rtol=1e-5)


def test_prefix_tuning_changes_outputs_only_through_the_prefixes(tiny_opt_dir, sst2, tmp_path):
    framework = make_framework(
        tiny_opt_dir, sst2, tmp_path, "--prefix_tuning", "--trainer", "LOZO", "--learning_rate", "1e-1"
    )
    model = framework.model
    text = torch.tensor([framework.tokenizer.encode("a fine, moving film")])
    with torch.no_grad(), model.disable_adapter():
        plain_before = model(input_ids=text).logits
    prefixed_before = model(input_ids=text).logits.detach()
    train(framework, sst2, steps=3)
    with torch.no_grad():
        prefixed_after = model(input_ids=text).logits
        with model.disable_adapter():
            plain_after = model(input_ids=text).logits
    assert torch.equal(plain_after, plain_before)  # without its prefixes the model is untouched
    assert not torch.allclose(prefixed_after, prefixed_before)  # with them, training moved it


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefix_tuned_model_generates_as_after_reading_its_prefix_tokens(family, models, data_dir):
    squad = tasks.get_task("SQuAD", str(data_dir))
    args = run_lozo.parse_args(
        [
            "--task_name",
            "SQuAD",
            "--model_name",
            str(models[family]),
            "--prefix_tuning",
            "--max_new_tokens",
            "6",
            "--trainer",
            "zo",
            "--train_set_seed",
            "0",
        ]
    )
    framework = run_lozo.Framework(args, squad)
    tokens = random_token_ids(framework.model.config.vocab_size, args.num_prefix, seed=args.seed).tolist()
    (input_ids,), _ = framework.encode([], squad.valid_samples[0])
    answer = framework.generate(input_ids)
    with framework.model.disable_adapter():
        plain = framework.generate(tokens + input_ids)
    assert answer == plain and answer  # a non-empty greedy answer, the same one
    assert framework.evaluate([], squad.valid_samples[:2])["f1"] >= 0


def run_cli(monkeypatch, tmp_path, data_dir, *argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOZO_DATA_DIR", str(data_dir))
    assert run_lozo.main([*argv, "--output_dir", str(tmp_path / "out"), "--report_to", "none"]) == 0


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_saved_adapter_reloads_and_reproduces_the_score(
    mode, tiny_opt_dir, sst2, data_dir, tmp_path, monkeypatch
):
    common = [
        "--task_name", "SST2", "--model_name", str(tiny_opt_dir), "--num_eval", "32", "--train_set_seed", "0",
        "--seed", "3",  # as make_framework: the same initial adapter
    ]  # fmt: skip
    run_cli(
        monkeypatch, tmp_path, data_dir, *common, *MODES[mode][0],
        "--trainer", "LOZO", "--num_train", "16", "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-1", "--train_as_classification",
    )  # fmt: skip
    trained = tmp_path / "result/SST2-tiny-opt-sampleeval32-ntrain16-trainset0.json"
    adapter = tmp_path / "result/SST2-tiny-opt-sampleeval32-ntrain16-trainset0-adapter"
    assert (adapter / "adapter_config.json").is_file()
    reloaded = ["--load_adapter", str(adapter), "--result_file", "reloaded.json"]
    run_cli(monkeypatch, tmp_path, data_dir, *common, *reloaded)
    reloaded_metrics, run = read_result(tmp_path / "reloaded.json")
    assert reloaded_metrics == read_result(trained)[0]
    assert run["settings"]["load_adapter"] == os.path.relpath(
        adapter, tmp_path
    )  # relative to the working folder

    # The saved adapter holds the trained values, not the initial ones.
    fresh = make_framework(tiny_opt_dir, sst2, tmp_path, *MODES[mode][0], "--trainer", "LOZO").model
    args = run_lozo.parse_args(["--model_name", str(tiny_opt_dir), "--load_adapter", str(adapter)])
    loaded = run_lozo.apply_tuning_mode(run_lozo.load_model(args), args)
    assert isinstance(loaded, PeftModel)
    initial = {n: p for n, p in fresh.named_parameters() if MODES[mode][1](n)}
    saved = {n: p for n, p in loaded.named_parameters() if MODES[mode][1](n)}
    assert initial.keys() == saved.keys() and initial
    assert all(not torch.equal(saved[n], initial[n]) for n in initial)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_linear_probe_makes_the_lm_the_fitted_classifier(family, models, sst2, tmp_path):
    framework = make_framework(models[family], sst2, tmp_path, "--linear_probing")
    train_samples = sst2.sample_train_sets(num_train=64, seed=0)[0]
    eval_samples = sst2.valid_samples[:64]
    before = snapshot(framework.model)
    weights, label_words = framework.linear_probe(train_samples)
    head = framework.model.get_output_embeddings().weight
    torch.testing.assert_close(head[label_words].double(), weights, rtol=0, atol=1e-6)

    # Only the label words' head rows changed (the probe untied the head from the embeddings).
    assert head is not framework.model.get_input_embeddings().weight
    changed = {n for n, p in framework.model.named_parameters() if not torch.equal(p, before[n][0])}
    assert changed == {"lm_head.weight"}
    rows = (head != before["lm_head.weight"][0]).any(1).nonzero().flatten().tolist()
    assert sorted(rows) == sorted(label_words)

    # Scoring the candidates now predicts exactly what the classifier predicts.
    features, labels, _ = framework.head_features(eval_samples)
    classifier_accuracy = float(np.mean((features @ weights.numpy().T).argmax(1) == labels))
    assert framework.evaluate([], eval_samples)["accuracy"] == pytest.approx(classifier_accuracy)
    train_features, train_labels, _ = framework.head_features(train_samples)
    train_accuracy = float(np.mean((train_features @ weights.numpy().T).argmax(1) == train_labels))
    assert train_accuracy > 0.6  # the probe fitted its training set (16-dim features, 64 samples)


def test_linear_probing_end_to_end_writes_the_result(tiny_opt_dir, data_dir, tmp_path, monkeypatch):
    run_cli(
        monkeypatch, tmp_path, data_dir,
        "--task_name", "RTE", "--model_name", str(tiny_opt_dir), "--linear_probing", "--lp_early_stopping",
        "--train_set_seed", "0", "--num_train", "32", "--num_eval", "16", "--save_model",
    )  # fmt: skip
    result = json.loads((tmp_path / "result/RTE-tiny-opt-sampleeval16-ntrain32-trainset0.json").read_text())
    assert 0 <= result["accuracy"] <= 1
    # --save_model keeps the probed head: the saved model differs from the original in the LM head only.
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_opt_dir)
    assert saved.get_output_embeddings().weight is not saved.get_input_embeddings().weight
    changed = (saved.lm_head.weight != original.lm_head.weight).any(1).sum().item()
    assert changed == 2  # RTE's two label words
    for name, param in original.model.named_parameters():
        assert torch.equal(param, saved.model.get_parameter(name)), name


@pytest.mark.parametrize(("mode", "packs"), [("lora", True), ("prefix", False), ("head", True)])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_padding_free_batches_through_each_mode(mode, packs, family, models, sst2, tmp_path):
    """LoRA and head tuning run packed rows (peft passes the mask and positions through); prefix tuning's
    prompts extend the 2-D mask, so it runs padded. Either way the loss is the padded batch's."""
    from utils import DataCollatorWithPaddingAndNesting, model_option_loss, takes_packed_batches

    framework = make_framework(models[family], sst2, tmp_path, *MODES[mode][0], "--trainer", "zo")
    model = framework.model
    assert takes_packed_batches(model) == packs
    features = framework.training_features(sst2.sample_train_sets(num_train=8, seed=0)[0])
    batch = DataCollatorWithPaddingAndNesting(framework.tokenizer.pad_token_id)(features)
    rows = []

    def record(_, args, kwargs):
        rows.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0])

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    inner.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        padded, packed = (
            float(model_option_loss(model, batch, framework.tokenizer.pad_token_id, pack=pack))
            for pack in (False, True)
        )
    assert packed == pytest.approx(padded, rel=1e-5)
    assert rows[0] == 8 and (rows[1] < 8) == packs
