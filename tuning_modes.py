"""Which parameters a run trains: all (default), LoRA or prefix tuning through `peft`, the LM head only
(`--head_tuning`), or a closed-form linear probe written into the label words' LM-head rows
(`--linear_probing`). The trainers see only `requires_grad` parameters, so every mode works with the
regular, zo and LOZO trainers alike.
"""

import logging
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model

from utils import UsageError, replace_folder

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "v_proj"]  # MeZO puts LoRA on the attention query and value projections


def untie_embeddings(model):
    """Give the LM head its own copy of the (tied) input embeddings, so it can change on its own."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def apply_tuning_mode(model, args):
    """Freeze or wrap `model` for the chosen mode; returns the model to train and evaluate."""
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping; nothing to act on.
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return _apply_tuning_mode(model, args)


def _apply_tuning_mode(model, args):
    if args.load_adapter:
        model = PeftModel.from_pretrained(model, args.load_adapter, is_trainable=args.trainer != "none")
    elif args.lora:
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as error:  # the architecture names its attention projections otherwise
            raise UsageError(
                f"--lora targets {LORA_TARGETS}, which {model.config.model_type} models lack "
                f"({str(error).splitlines()[0]})"
            ) from None
    elif args.prefix_tuning:
        model = add_prefixes(model, args)
    elif args.head_tuning:
        head = model.get_output_embeddings().weight
        for param in model.parameters():
            param.requires_grad_(param is head)
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("%s: %d of %d parameters trainable", model.peft_type, trainable, total)
    return model


def add_prefixes(model, args):
    """MeZO's prefix tuning as peft's: `num_prefix` trainable key/value vectors in every attention layer,
    directly (--no_reparam) or through peft's MLP reparameterisation. The text that follows sits at
    positions num_prefix, num_prefix + 1, … (peft treats the prefixes as cached tokens)."""
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=args.num_prefix,
        prefix_projection=not args.no_reparam,
    )
    if not args.prefix_init_by_real_act:
        return get_peft_model(model, config)
    token_ids = random_token_ids(model.config.vocab_size, args.num_prefix, args.seed)
    activations = real_prefix_activations(model, token_ids)  # from the plain model, before peft wraps it
    model = get_peft_model(model, config)
    model.prompt_encoder[model.active_adapter].embedding.weight.data.copy_(activations)
    logger.info("prefixes initialised from the activations of tokens %s", token_ids.tolist())
    return model


def random_token_ids(vocab_size, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (count,), generator=generator)


@torch.no_grad()
def real_prefix_activations(model, token_ids):
    """The keys and values every layer computes for `token_ids`, laid out as peft's prefix embedding
    (num_prefix, layers × {key, value} × heads × head_dim): the prefixed model then starts out exactly as
    the plain model does after reading those tokens."""
    cache = model(input_ids=token_ids.to(model.device)[None], use_cache=True).past_key_values
    # Each layer's keys/values are (1, heads, tokens, head_dim).
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    stacked = torch.stack(per_layer)  # layers, 2, heads, tokens, head_dim
    return stacked.permute(3, 0, 1, 2, 4).reshape(len(token_ids), -1)


def save_adapter(model, path):
    """Write the PEFT adapter to `path` through a temporary folder, so `path` is never half-written."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".tmp")
    try:
        model.save_pretrained(tmp)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("adapter saved to %s", path)


# ---- linear probing ----


def fit_linear_probe(features, labels, num_classes, early_stopping, seed=0):
    """Multinomial logistic regression without intercept (cross-validated C, as MeZO): one weight row per
    class, so that writing row k into the LM head row of label word k makes the LM the classifier."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    if len(np.unique(labels)) < 2:
        raise UsageError("--linear_probing needs training samples of at least two classes; raise --num_train")
    tol, max_iter = (1e-2, 1000) if early_stopping else (1e-4, 5000)
    folds = min(5, np.bincount(labels, minlength=num_classes).min())
    common = dict(fit_intercept=False, tol=tol, max_iter=max_iter, random_state=seed)
    if folds >= 2:
        # MeZO's choice of C: cross-validated accuracy, plain L2 penalty (spelled out for sklearn >= 1.9).
        classifier = LogisticRegressionCV(
            cv=folds, scoring="accuracy", l1_ratios=(0.0,), use_legacy_attributes=False, **common
        ).fit(features, labels)
    else:  # a class with a single example: no cross-validation possible
        classifier = LogisticRegression(**common).fit(features, labels)
    weights = np.zeros((num_classes, features.shape[1]))
    classes = classifier.classes_
    if len(classes) == 2:  # sklearn keeps one row w for p(class 1) = σ(w·x): logits ±w/2 are the same model
        weights[classes[0]], weights[classes[1]] = -classifier.coef_[0] / 2, classifier.coef_[0] / 2
    else:
        weights[classes] = classifier.coef_
    return torch.from_numpy(weights)


@torch.no_grad()
def write_head_rows(model, label_token_ids, weights):
    head = model.get_output_embeddings()
    ids = torch.tensor(label_token_ids, device=head.weight.device)
    head.weight[ids] = weights.to(head.weight)
    if getattr(head, "bias", None) is not None:
        head.bias[ids] = 0


class HeadInputs:
    """Records what the LM head receives (the final hidden states) during a forward pass."""

    def __init__(self, model):
        self.captured = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        self.captured = inputs[0].detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
