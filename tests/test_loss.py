"""Training batches and the option loss (spec TASKS.md §6): `DataCollatorWithPaddingAndNesting`, `target_mask`
and `option_loss` against log-probabilities computed here by hand from the logits."""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from utils import DataCollatorWithPaddingAndNesting, option_loss, target_mask

PAD = 1  # OPT's pad id
VOCAB = 13


def random_logits(rows, length, seed=0, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(rows, length, vocab, generator=generator)


def token_log_prob(logits, input_ids, row, position):
    """log p(input_ids[row, position] | ids before it), written out: logit minus log-sum-exp, in float64."""
    scores = logits[row, position - 1].double()
    return float(scores[input_ids[row, position]] - torch.logsumexp(scores, dim=0))


# ---------------------------------------------------------------------------------------------------------
# Collator


def test_collator_flattens_nested_candidates_and_right_pads():
    features = [
        [  # a Copa-like sample: 2 candidates, gold 1
            {"input_ids": [2, 10, 11], "labels": 1, "option_len": 1, "num_options": 2},
            {"input_ids": [2, 10, 12, 13], "labels": 1, "option_len": 2, "num_options": 2},
        ],
        [  # a CB-like sample: 3 candidates, gold 2
            {"input_ids": [2, 20], "labels": 2, "option_len": 1, "num_options": 3},
            {"input_ids": [2, 21, 22, 23, 24], "labels": 2, "option_len": 3, "num_options": 3},
            {"input_ids": [2, 25], "labels": 2, "option_len": 1, "num_options": 3},
        ],
    ]
    batch = DataCollatorWithPaddingAndNesting(pad_token_id=PAD)(features)
    assert batch["input_ids"].tolist() == [
        [2, 10, 11, 1, 1],
        [2, 10, 12, 13, 1],
        [2, 20, 1, 1, 1],
        [2, 21, 22, 23, 24],
        [2, 25, 1, 1, 1],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [1, 1, 2, 2, 2]
    assert batch["option_len"].tolist() == [1, 2, 1, 3, 1]
    assert batch["num_options"].tolist() == [2, 2, 3, 3, 3]
    assert all(batch[key].dtype == torch.long for key in batch)


def test_collator_plain_features_and_pad_id_inside_a_sequence():
    # Gold-only sequences (Copa, ReCoRD, SQuAD, DROP): plain dicts, no labels / num_options.
    # Llama-style pad id 0; a real 0 inside a sequence still counts as real in the attention mask.
    features = [{"input_ids": [5, 0, 6], "option_len": 1}, {"input_ids": [7], "option_len": 1}]
    batch = DataCollatorWithPaddingAndNesting(pad_token_id=0)(features)
    assert sorted(batch) == ["attention_mask", "input_ids", "option_len"]
    assert batch["input_ids"].tolist() == [[5, 0, 6], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["option_len"].tolist() == [1, 1]

    batch = DataCollatorWithPaddingAndNesting(pad_token_id=9)(
        [{"input_ids": [3, 4]}, {"input_ids": [5, 6, 7]}]
    )
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert batch["input_ids"].tolist() == [[3, 4, 9], [5, 6, 7]]


# ---------------------------------------------------------------------------------------------------------
# target_mask

MASK_IDS = torch.tensor(
    [
        [2, 10, 11, 12, 13],  # 5 real ids
        [2, 10, 11, 1, 1],  # 3 real ids, then padding
        [2, 10, 1, 11, 1],  # 4 real ids, the third is a real token equal to the pad id
        [2, 10, 11, 1, 1],  # 3 real ids, option_len longer than the sequence
    ]
)
MASK_ATTENTION = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_target_mask_last_option_len_real_ids():
    mask = target_mask(MASK_IDS, MASK_ATTENTION, torch.tensor([2, 1, 3, 5]), PAD)
    # Column j is the prediction of id j + 1.
    assert mask.tolist() == [
        [False, False, True, True],  # ids 12, 13
        [False, True, False, False],  # id 11 (the last real one), not the padding
        [True, False, True, False],  # ids 10, 11: the pad-valued id is never a target
        [True, True, False, False],  # everything after the first id
    ]
    assert mask.dtype == torch.bool


def test_target_mask_without_option_len_is_every_real_next_token():
    mask = target_mask(MASK_IDS, MASK_ATTENTION, None, PAD)
    assert mask.tolist() == [
        [True, True, True, True],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, False],
    ]


# ---------------------------------------------------------------------------------------------------------
# option_loss: token cross-entropy

TOKEN_FEATURES = [
    {"input_ids": [2, 30, 31, 32, 33, 34], "option_len": 2},
    {"input_ids": [2, 40, 41], "option_len": 1},
    {"input_ids": [2, 50, 51, 52], "option_len": 3},
    {"input_ids": [2, 60, 61, 62, 63], "option_len": 2},
]
# (row, position) of every target id, by hand: the last option_len ids of each sequence.
TOKEN_TARGETS = [(0, 4), (0, 5), (1, 2), (2, 1), (2, 2), (2, 3), (3, 3), (3, 4)]
LM_TARGETS = [(0, p) for p in range(1, 6)] + [(1, 1), (1, 2)] + [(2, p) for p in (1, 2, 3)]
LM_TARGETS += [(3, p) for p in (1, 2, 3, 4)]


def small_vocab(features):
    """Ids mapped into the small random vocabulary (pad 1 untouched, no real id equals it)."""
    return [f | {"input_ids": [2] + [4 + i % (VOCAB - 4) for i in f["input_ids"][1:]]} for f in features]


def collate(features, pad=PAD):
    return DataCollatorWithPaddingAndNesting(pad_token_id=pad)(features)


def test_token_loss_with_option_len_is_mean_over_all_batch_targets():
    batch = collate(small_vocab(TOKEN_FEATURES))
    logits = random_logits(4, batch["input_ids"].shape[1])
    expected = -sum(token_log_prob(logits, batch["input_ids"], r, p) for r, p in TOKEN_TARGETS) / len(
        TOKEN_TARGETS
    )
    loss = option_loss(logits, batch, PAD)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    # Not the mean of per-sequence means (rows have 2, 1, 3, 2 targets).
    per_row = [
        -sum(token_log_prob(logits, batch["input_ids"], r, p) for r, p in TOKEN_TARGETS if r == row)
        / sum(1 for r, _ in TOKEN_TARGETS if r == row)
        for row in range(4)
    ]
    assert abs(sum(per_row) / 4 - expected) > 1e-3


def test_plain_lm_loss_uses_every_real_next_token():
    features = [{"input_ids": f["input_ids"]} for f in small_vocab(TOKEN_FEATURES)]
    batch = collate(features)
    logits = random_logits(4, batch["input_ids"].shape[1], seed=1)
    expected = -sum(token_log_prob(logits, batch["input_ids"], r, p) for r, p in LM_TARGETS) / len(LM_TARGETS)
    assert float(option_loss(logits, batch, PAD)) == pytest.approx(expected, abs=1e-5)


def test_token_loss_ignores_padding_logits():
    # Whatever the logits at padded positions hold (even huge values), the loss does not move.
    batch = collate(small_vocab(TOKEN_FEATURES))
    logits = random_logits(4, batch["input_ids"].shape[1], seed=2)
    loss = option_loss(logits, batch, PAD)
    poisoned = logits.clone()
    poisoned[1, 2:] = 1e4  # row 1 has 3 real ids: positions 2.. predict only padding
    assert float(option_loss(poisoned, batch, PAD)) == pytest.approx(float(loss), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# option_loss: train as classification


def candidate(ids, label, option_len, num_options):
    return {"input_ids": ids, "labels": label, "option_len": option_len, "num_options": num_options}


# Copa-like (2 candidates, gold 1), CB-like (3 candidates, gold 2), Copa-like (2 candidates, gold 0).
MIXED = [
    [candidate([2, 5, 6, 7], 1, 1, 2), candidate([2, 5, 6, 8, 9], 1, 2, 2)],
    [candidate([2, 4, 10], 2, 1, 3), candidate([2, 4, 11], 2, 1, 3), candidate([2, 4, 12, 5, 6, 7], 2, 4, 3)],
    [candidate([2, 8, 9, 10, 11], 0, 2, 2), candidate([2, 8, 9, 12], 0, 1, 2)],
]
# Per flattened row: the target positions (last option_len ids), by hand.
MIXED_TARGETS = [[3], [3, 4], [2], [2], [2, 3, 4, 5], [3, 4], [3]]
MIXED_GROUPS = [(0, 2, 1), (2, 5, 2), (5, 7, 0)]  # (first row, end row, gold index)


def test_collator_one_row_per_sample_when_every_option_is_one_token():
    features = [
        [candidate([2, 5, 6, 7], 1, 1, 2), candidate([2, 5, 6, 8], 1, 1, 2)],  # SST-2-like, gold 1
        [candidate([2, 4, 10], 2, 1, 3), candidate([2, 4, 11], 2, 1, 3), candidate([2, 4, 12], 2, 1, 3)],
    ]
    batch = collate(features)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 7], [2, 4, 10, PAD]]  # each sample's first candidate
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["candidate_ids"].tolist() == [[7, 8, -1], [10, 11, 12]]  # -1: no third candidate
    assert batch["labels"].tolist() == [1, 2] and batch["option_len"].tolist() == [1, 1]
    assert "num_options" not in batch
    # One sample whose prompts differ (or whose option has two tokens) and the batch is flattened.
    for odd in ([candidate([2, 9, 7], 0, 1, 2), candidate([2, 5, 8], 0, 1, 2)], MIXED[0]):
        assert collate([features[0], odd])["input_ids"].shape[0] == 4


def classification_loss_by_hand(logits, input_ids, targets, groups):
    scores = [
        sum(token_log_prob(logits, input_ids, row, p) for p in positions) / len(positions)
        for row, positions in enumerate(targets)
    ]
    losses = []
    for start, end, gold in groups:
        group = scores[start:end]
        log_norm = math.log(sum(math.exp(s) for s in group))
        losses.append(log_norm - group[gold])
    return losses


def test_classification_loss_mixed_num_options():
    batch = collate(MIXED)
    assert batch["num_options"].tolist() == [2, 2, 3, 3, 3, 2, 2]
    logits = random_logits(7, batch["input_ids"].shape[1], seed=3)
    losses = classification_loss_by_hand(logits, batch["input_ids"], MIXED_TARGETS, MIXED_GROUPS)
    assert float(option_loss(logits, batch, PAD)) == pytest.approx(sum(losses) / 3, abs=1e-5)
    # Scored by the mean (not the sum) of the target log-probs: a sum-based score gives another value.
    sums = [
        sum(token_log_prob(logits, batch["input_ids"], r, p) for p in ps)
        for r, ps in enumerate(MIXED_TARGETS)
    ]
    cb = sums[2:5]
    assert abs(math.log(sum(math.exp(s) for s in cb)) - cb[2] - losses[1]) > 1e-3


def test_classification_loss_uniform_num_options_matches_batched_cross_entropy():
    samples = [MIXED[0], MIXED[2], [candidate([2, 7, 7], 0, 1, 2), candidate([2, 7, 8, 9], 0, 2, 2)]]
    batch = collate(samples)
    targets = [MIXED_TARGETS[0], MIXED_TARGETS[1], MIXED_TARGETS[5], MIXED_TARGETS[6], [2], [2, 3]]
    logits = random_logits(6, batch["input_ids"].shape[1], seed=4)
    scores = torch.tensor(
        [
            sum(token_log_prob(logits, batch["input_ids"], r, p) for p in ps) / len(ps)
            for r, ps in enumerate(targets)
        ]
    ).view(3, 2)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0, 0]))
    assert float(option_loss(logits, batch, PAD)) == pytest.approx(float(expected), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# reduction="sum": micro-batches combine into the whole-batch mean


def split_loss(features, logits, cut):
    """(sum, count) of each part, each collated on its own (its own padding width)."""
    rows = [len(f) if isinstance(f, list) else 1 for f in features]
    first_rows = sum(rows[:cut])
    parts = []
    for part, row_slice in (
        (features[:cut], slice(0, first_rows)),
        (features[cut:], slice(first_rows, None)),
    ):
        batch = collate(part)
        parts.append(
            option_loss(logits[row_slice, : batch["input_ids"].shape[1]], batch, PAD, reduction="sum")
        )
    return parts


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_sum_reduction_token_loss_combines_exactly(cut):
    features = small_vocab(TOKEN_FEATURES)
    whole = collate(features)
    logits = random_logits(4, whole["input_ids"].shape[1], seed=5)
    mean = option_loss(logits, whole, PAD)
    total, count = option_loss(logits, whole, PAD, reduction="sum")
    assert int(count) == len(TOKEN_TARGETS)
    assert float(total) == pytest.approx(float(mean) * len(TOKEN_TARGETS), abs=1e-5)
    (s1, c1), (s2, c2) = split_loss(features, logits, cut)
    assert int(c1) == sum(1 for r, _ in TOKEN_TARGETS if r < cut)
    assert int(c1) + int(c2) == len(TOKEN_TARGETS)
    assert float((s1 + s2) / (c1 + c2)) == pytest.approx(float(mean), abs=1e-6)


@pytest.mark.parametrize("cut", [1, 2])
def test_sum_reduction_classification_combines_exactly(cut):
    whole = collate(MIXED)
    logits = random_logits(7, whole["input_ids"].shape[1], seed=6)
    mean = option_loss(logits, whole, PAD)
    total, count = option_loss(logits, whole, PAD, reduction="sum")
    assert int(count) == 3  # one item per sample, not per candidate
    losses = classification_loss_by_hand(logits, whole["input_ids"], MIXED_TARGETS, MIXED_GROUPS)
    assert float(total) == pytest.approx(sum(losses), abs=1e-5)
    (s1, c1), (s2, c2) = split_loss(MIXED, logits, cut)
    assert (int(c1), int(c2)) == (cut, 3 - cut)
    assert float(s1) == pytest.approx(sum(losses[:cut]), abs=1e-5)
    assert float((s1 + s2) / (c1 + c2)) == pytest.approx(float(mean), abs=1e-6)


def test_sum_reduction_plain_lm_loss_combines_exactly():
    features = [{"input_ids": f["input_ids"]} for f in small_vocab(TOKEN_FEATURES)]
    whole = collate(features)
    logits = random_logits(4, whole["input_ids"].shape[1], seed=7)
    (s1, c1), (s2, c2) = split_loss(features, logits, 1)
    assert (int(c1), int(c2)) == (5, len(LM_TARGETS) - 5)
    assert float((s1 + s2) / (c1 + c2)) == pytest.approx(float(option_loss(logits, whole, PAD)), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# A real (tiny, random) OPT model


def test_option_loss_on_tiny_opt(tiny_opt_dir, opt_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()
    tokenizer = opt_tokenizer
    prompt = "The man turned on the faucet so"
    texts = [prompt + " water flowed from the spout.", "It was great", "Suppose it rained. Yes"]
    features = []
    for text, stem in zip(texts, [prompt, "It was", "Suppose it rained."], strict=True):
        ids = tokenizer.encode(text)
        features.append({"input_ids": ids, "option_len": len(ids) - len(tokenizer.encode(stem))})
    batch = collate(features, pad=tokenizer.pad_token_id)
    assert tokenizer.pad_token_id == PAD
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-1] == model.config.vocab_size

    loss = option_loss(logits, batch, PAD)
    assert torch.isfinite(loss)
    targets = [
        (row, p)
        for row, f in enumerate(features)
        for p in range(len(f["input_ids"]) - f["option_len"], len(f["input_ids"]))
    ]
    assert len(targets) == sum(f["option_len"] for f in features)
    expected = -sum(token_log_prob(logits, batch["input_ids"], r, p) for r, p in targets) / len(targets)
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    # A random tiny model is close to uniform over its vocabulary.
    assert abs(float(loss) - math.log(model.config.vocab_size)) < 0.5

    # Without option_len, the plain LM loss equals the model's own loss with padding labels ignored.
    plain = {k: v for k, v in batch.items() if k != "option_len"}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss
    assert float(option_loss(logits, plain, PAD)) == pytest.approx(float(reference), abs=1e-4)


@pytest.mark.parametrize("task_name", ["RTE", "CB"])
def test_one_row_per_sample_gives_the_flattened_loss_and_gradient(task_name, tiny_opt_dir, opt_tokenizer):
    """Real RTE / CB samples (2 / 3 one-token candidates) through a tiny OPT in float64: the one-row batch
    gives the loss and gradient of the batch with every candidate as a row, to rounding."""
    from transformers import AutoModelForCausalLM

    from utils import model_option_loss

    groups = real_groups(task_name, opt_tokenizer, 6)
    one_row = collate(groups)
    flat = collate([c for group in groups for c in group])  # plain rows: the layout before
    assert "candidate_ids" in one_row and one_row["input_ids"].shape[0] == len(groups)
    assert flat["input_ids"].shape[0] == sum(map(len, groups))

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).double()
    results = []
    for batch in (one_row, flat):
        model.zero_grad()
        total, count = model_option_loss(model, batch, PAD, reduction="sum")
        total.backward()
        results.append((float(total.detach()), count, model.model.decoder.layers[0].fc1.weight.grad.clone()))
    (one_loss, one_count, one_grad), (flat_loss, flat_count, flat_grad) = results
    assert one_count == flat_count == len(groups)
    assert one_loss == pytest.approx(flat_loss, rel=1e-12)
    assert flat_grad.abs().max() > 0
    torch.testing.assert_close(one_grad, flat_grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Padding-free batches (pack_batch)


def test_packed_rows_first_fit_decreasing_by_hand():
    from utils import packed_rows

    # 5 fills row 0; 4 opens row 1; 3 opens row 2; 2 fits beside 3; 1 fits beside 4.
    assert packed_rows([5, 3, 2, 4, 1], 5) == [[0], [3, 4], [1, 2]]
    assert packed_rows([3, 3, 3], 3) == [[0], [1], [2]]  # nothing shares a row


def real_groups(task_name, tokenizer, count):
    """The first `count` training samples of a task as run_lozo's classification features."""
    from classification_batch import training_groups

    return training_groups(task_name, tokenizer, count, DATA_DIR)


def test_packed_rows_on_real_rte_lengths(opt_tokenizer):
    from utils import packed_rows

    lengths = [len(group[0]["input_ids"]) for group in real_groups("RTE", opt_tokenizer, 16)]
    rows = packed_rows(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(16))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    assert len(rows) < 16


def layouts(layout, tokenizer):
    """Real RTE training batches: 8 samples one row each (candidate_ids), 4 samples one row per candidate
    (num_options), and those candidates as plain language-model rows (no option_len)."""
    if layout == "one row per sample":
        return collate(real_groups("RTE", tokenizer, 8), pad=tokenizer.pad_token_id)
    flat = [c for group in real_groups("RTE", tokenizer, 4) for c in group]
    if layout == "one row per candidate":
        return collate(flat, pad=tokenizer.pad_token_id)
    return collate([{"input_ids": c["input_ids"]} for c in flat], pad=tokenizer.pad_token_id)


@pytest.mark.parametrize("layout", ["one row per sample", "one row per candidate", "plain LM"])
@pytest.mark.parametrize("model_fixture", ["tiny_opt_dir", "tiny_llama_dir"])
def test_packed_batch_gives_the_padded_loss_and_gradient(layout, model_fixture, request):
    """The same real batch padded and packed (fewer rows, block-diagonal attention) through a tiny OPT and
    a tiny Llama in float64: equal loss and gradient, to rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils import model_option_loss, pack_batch, takes_packed_batches, target_mask

    path = request.getfixturevalue(model_fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = layouts(layout, tokenizer)
    pad = tokenizer.pad_token_id
    mask = target_mask(batch["input_ids"], batch["attention_mask"], batch.get("option_len"), pad)
    keep = torch.nn.functional.pad(mask, (0, 1))
    packed_inputs, _ = pack_batch(batch["input_ids"], batch["attention_mask"], keep)
    assert packed_inputs["input_ids"].shape[0] < batch["input_ids"].shape[0]

    model = AutoModelForCausalLM.from_pretrained(path).double()
    assert takes_packed_batches(model)
    results = []
    for pack in (False, True):
        model.zero_grad()
        total, count = model_option_loss(model, batch, pad, reduction="sum", pack=pack)
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((float(total.detach()), count, grads))
    (padded_loss, padded_count, padded_grad), (packed_loss, packed_count, packed_grad) = results
    assert packed_count == padded_count
    assert packed_loss == pytest.approx(padded_loss, rel=1e-12)
    assert padded_grad.abs().max() > 0
    torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-9, atol=1e-12)


def test_packing_is_skipped_where_attention_adds_the_mask(tiny_opt_dir, opt_tokenizer):
    """Eager attention adds its mask to the scores (a boolean one would be wrong): the padded batch runs."""
    from transformers import AutoModelForCausalLM

    from utils import model_option_loss, takes_packed_batches

    batch = layouts("one row per sample", opt_tokenizer)
    eager = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, attn_implementation="eager").double()
    assert not takes_packed_batches(eager)
    rows = []

    def record(_, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])

    eager.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        packed = model_option_loss(eager, batch, PAD, pack=True)
        padded = model_option_loss(eager, batch, PAD, pack=False)
    assert rows == [8, 8]
    assert float(packed) == float(padded)
