"""`utils.encode_prompt` and `utils.tokenizer_adds_bos` against the spec (shared/spec/TASKS.md §1-4, §6, §9).

The expected strings are built here from the raw jsonl rows, following the spec's formats; they never call
templates.py. `encode_prompt` is fed the samples that tasks.py loads at the same row positions, and must
return exactly the token ids of those strings (and the spec's option lengths), with both an OPT-style
tokenizer (prepends BOS) and the real SmolLM2-135M tokenizer (adds nothing).
"""

import gzip
import json
from functools import cache
from pathlib import Path

import pytest
from conftest import build_opt_tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

import tasks
from utils import UsageError, encode_prompt, tokenizer_adds_bos

TASK_NAMES = ["SST2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "Copa", "ReCoRD", "SQuAD", "DROP"]
CLASSIFICATION_TASKS = TASK_NAMES[:-2]
GENERATION_TASKS = ["SQuAD", "DROP"]
FOLDERS = {name: name.lower() for name in TASK_NAMES}

# Valid rows chosen for their quirks: SST2 ends with a space, CB is neutral (3rd word), WSC's pronoun is
# capitalised ("He"), MultiRC's paragraph ends with a space, Copa 7 is a "cause" row whose choices start
# with "I", ReCoRD has "@highlight" lines, SQuAD 19 has a trailing space in its question and duplicated
# golds, DROP 0's passage starts with a space and has two gold spans.
EVAL_POSITION = {name: 0 for name in TASK_NAMES} | {"CB": 1, "WSC": 9, "Copa": 7, "SQuAD": 19}
# Demonstrations: train rows, deliberately not in file order (they arrive in permutation order).
DEMO_POSITIONS = (4, 0, 2)
BIG = 100_000  # a max_length that never truncates

LABEL_WORDS = {
    "SST2": ("terrible", "great"),
    "RTE": ("Yes", "No"),
    "CB": ("Yes", "No", "Maybe"),
    "WSC": ("No", "Yes"),
    "WIC": ("No", "Yes"),
    "MultiRC": ("No", "Yes"),
}


# ---------------------------------------------------------------------------------------------------------
# Raw rows and the spec's strings, written from TASKS.md


@cache
def raw_row(data_dir, name, split, position):
    """Row `position` (0-based, blank lines skipped) of the task's train / validation jsonl file."""
    folder = Path(data_dir) / FOLDERS[name]
    stem = "train" if split == "train" else "validation"
    path = folder / f"{stem}.jsonl"
    opener = open
    if not path.exists():
        path, opener = folder / f"{stem}.jsonl.gz", gzip.open
    with opener(path, "rt", encoding="utf-8") as lines:
        rows = (line for line in lines if line.strip())
        for index, line in enumerate(rows):
            if index == position:
                return json.loads(line)
    raise IndexError(position)


def spec_candidates(name, row):
    if name in LABEL_WORDS:
        return list(range(len(LABEL_WORDS[name])))
    return {
        "BoolQ": lambda: ["Yes", "No"],
        "Copa": lambda: [row["choice1"], row["choice2"]],
        "ReCoRD": lambda: row["entities"],
        "SQuAD": lambda: None,
        "DROP": lambda: None,
    }[name]()


def spec_correct(name, row):
    if name in LABEL_WORDS:
        return row["label"]
    return {
        "BoolQ": lambda: "Yes" if row["answer"] else "No",
        "Copa": lambda: row[f"choice{row['label'] + 1}"],
        "ReCoRD": lambda: row["answers"],
        "SQuAD": lambda: row["answers"]["text"],
        "DROP": lambda: row["answers_spans"]["spans"],
    }[name]()


def word(name, candidate):
    return LABEL_WORDS[name][candidate] if name in LABEL_WORDS else candidate


def copa_premise(row):
    premise = row["premise"].rstrip()
    return premise[:-1] if premise.endswith(".") else premise


def copa_connector(row):
    return {"effect": "so", "cause": "because"}[row["question"]]


def copa_case(choice):
    pieces = choice.split(" ")
    if pieces[0] != "I":
        pieces[0] = pieces[0].lower()
    return " ".join(pieces)


def record_query(row, candidate):
    entity = candidate[0] if isinstance(candidate, list) else candidate
    return row["query"].replace("@placeholder", entity)


def boolq_question(question):
    if not question.endswith("?"):
        question += "?"
    return question[0].upper() + question[1:]


def spec_encode(name, row):
    if name == "SST2":
        return f"{row['sentence'].strip()} It was"
    if name == "RTE":
        return f'{row["premise"]}\nDoes this mean that "{row["hypothesis"]}" is true? Yes or No?\n'
    if name == "CB":
        return f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?\n'
    if name == "BoolQ":
        return f"{row['passage']} {boolq_question(row['question'])}\n"
    if name == "WSC":
        pronoun, noun = row["span2_text"].lower(), row["span1_text"]
        return (
            f'{row["text"]}\nIn the previous sentence, does the pronoun "{pronoun}" refer to {noun}? '
            "Yes or No?\n"
        )
    if name == "WIC":
        return (
            f'Does the word "{row["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{row['sentence1']}\n{row['sentence2']}\n"
        )
    if name == "MultiRC":
        return (
            f"{row['paragraph']}\nQuestion: {row['question']}\n"
            f'I found this answer "{row["answer"]}". Is that correct? Yes or No?\n'
        )
    if name == "Copa":
        return f"{copa_premise(row)} {copa_connector(row)} "
    if name == "ReCoRD":
        return row["passage"].replace("@highlight\n", "- ") + "\n-"
    if name == "SQuAD":
        return (
            f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
        )
    if name == "DROP":
        return f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"
    raise KeyError(name)


def spec_verbalize(name, row, candidate):
    if name == "SST2":
        return f"{row['sentence'].strip()} It was {word(name, candidate)}"
    if name == "Copa":
        return f"{copa_premise(row)} {copa_connector(row)} {copa_case(candidate)}"
    if name == "ReCoRD":
        return row["passage"].replace("@highlight\n", "- ") + "\n- " + record_query(row, candidate)
    if name == "SQuAD":
        return spec_encode(name, row) + f" {row['answers']['text'][0]}\n"
    if name == "DROP":
        return spec_encode(name, row) + f" {row['answers_spans']['spans'][0]}\n"
    return spec_encode(name, row) + word(name, candidate)


def spec_encode_sfc(name, row):
    if name == "Copa":
        return copa_connector(row)
    return {"SST2": " It was", "ReCoRD": "-"}.get(name, "")


def spec_verbalize_sfc(name, row, candidate):
    if name == "SST2":
        return f" It was {word(name, candidate)}"
    if name == "Copa":
        return f"{copa_connector(row)} {copa_case(candidate)}"
    if name == "ReCoRD":
        return "- " + record_query(row, candidate)
    return word(name, candidate)


def trim_sp(text):
    return text.strip(" ")


def spec_prompt(tokenizer, name, demos, row, sfc=False, icl_sfc=False, generation=False, with_gold=False):
    """§4 steps 1-6: (texts, option_lens) for raw `row` with raw `demos` as demonstrations."""
    block = "\n\n".join(spec_verbalize(name, d, spec_correct(name, d)).strip() for d in demos).strip()
    calibrate = sfc or icl_sfc
    encode = spec_encode_sfc if calibrate else spec_encode
    verbalize = spec_verbalize_sfc if calibrate else spec_verbalize
    prompt = trim_sp(encode(name, row))
    prompt_len = len(tokenizer.encode(prompt))

    def with_demos(text):
        return trim_sp((block + "\n\n" + text).lstrip())

    if generation:
        if with_gold:
            option = trim_sp(verbalize(name, row, spec_correct(name, row)))
            return [with_demos(option)], [len(tokenizer.encode(option)) - prompt_len]
        return [with_demos(prompt)], [0]
    options = [trim_sp(verbalize(name, row, c)) for c in spec_candidates(name, row)]
    lens = [len(tokenizer.encode(o)) - prompt_len for o in options]
    return (options if sfc else [with_demos(o) for o in options]), lens


def spec_truncate(ids, limit, adds_bos):
    """§4.7 in words: K = ids to keep after the BOS (or of all ids); K = 0 keeps everything, K < 0 drops
    the first -K (non-BOS) ids, K > 0 keeps the last K."""
    head, body = (ids[:1], ids[1:]) if adds_bos else ([], ids)
    keep = limit - 1 if adds_bos else limit
    if keep == 0:
        kept = body
    elif keep < 0:
        kept = body[-keep:]  # -keep > 0: drop that many from the front
    else:
        kept = body[max(len(body) - keep, 0) :]
    return head + kept


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@cache
def load_task(name, data_dir):
    return tasks.get_task(name, data_dir=data_dir)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=["opt", "smollm2"])
def tokenizer(request):
    return request.getfixturevalue("opt_tokenizer" if request.param == "opt" else "smol_tokenizer")


class Case:
    """One task: the loaded task, its template, the eval sample and demos, and their raw rows."""

    def __init__(self, name, data_dir, eval_position=None, demo_positions=DEMO_POSITIONS):
        data_dir = str(data_dir)
        self.name = name
        self.task = load_task(name, data_dir)
        self.template = self.task.get_template()
        position = EVAL_POSITION[name] if eval_position is None else eval_position
        self.sample = self.task.samples["valid"][position]
        self.row = raw_row(data_dir, name, "valid", position)
        self.demos = [self.task.samples["train"][p] for p in demo_positions]
        self.demo_rows = [raw_row(data_dir, name, "train", p) for p in demo_positions]
        # The loaded samples must be these rows (spec §1), else the comparison below would be meaningless.
        assert self.sample.candidates == spec_candidates(name, self.row)
        assert self.sample.correct_candidate == spec_correct(name, self.row)
        for demo, demo_row in zip(self.demos, self.demo_rows, strict=True):
            assert demo.correct_candidate == spec_correct(name, demo_row)

    def encode(self, tokenizer, demos=True, max_length=BIG, **flags):
        return encode_prompt(
            self.task,
            self.template,
            self.demos if demos else [],
            self.sample,
            tokenizer,
            max_length,
            **flags,
        )

    def expected(self, tokenizer, demos=True, **flags):
        texts, lens = spec_prompt(tokenizer, self.name, self.demo_rows if demos else [], self.row, **flags)
        return [tokenizer.encode(t) for t in texts], lens


# ---------------------------------------------------------------------------------------------------------
# Literal strings for a few rows: check the builders above as much as the code


def test_literal_sst2_zero_shot_and_demos(data_dir, opt_tokenizer):
    case = Case("SST2", data_dir, demo_positions=(2, 0))
    encodings, lens = case.encode(opt_tokenizer, demos=False)
    texts = [
        "it 's a charming and often affecting journey . It was terrible",
        "it 's a charming and often affecting journey . It was great",
    ]
    assert encodings == [opt_tokenizer.encode(t) for t in texts]
    prompt_len = len(opt_tokenizer.encode("it 's a charming and often affecting journey . It was"))
    assert lens == [len(opt_tokenizer.encode(t)) - prompt_len for t in texts]
    assert lens == [1, 1]

    encodings, _ = case.encode(opt_tokenizer)
    block = (
        "that loves its characters and communicates something rather beautiful about human nature"
        " It was great"
        "\n\nhide new secretions from the parental units It was terrible"
    )
    assert encodings == [opt_tokenizer.encode(block + "\n\n" + t) for t in texts]

    encodings, lens = case.encode(opt_tokenizer, sfc=True)
    assert encodings == [opt_tokenizer.encode("It was terrible"), opt_tokenizer.encode("It was great")]
    assert lens == [len(opt_tokenizer.encode("It was great")) - len(opt_tokenizer.encode("It was"))] * 2


def test_literal_copa_cause_effect_and_casing(data_dir, opt_tokenizer):
    cause = Case("Copa", data_dir, demo_positions=(0,))
    encodings, lens = cause.encode(opt_tokenizer, demos=False)
    texts = [
        "My eyes became red and puffy because I was sobbing.",
        "My eyes became red and puffy because I was laughing.",
    ]
    assert encodings == [opt_tokenizer.encode(t) for t in texts]
    prompt_len = len(opt_tokenizer.encode("My eyes became red and puffy because"))
    assert lens == [len(opt_tokenizer.encode(t)) - prompt_len for t in texts]

    encodings, _ = cause.encode(opt_tokenizer, icl_sfc=True)
    demo = "My body cast a shadow over the grass because the sun was rising."
    assert encodings == [
        opt_tokenizer.encode(demo + "\n\nbecause I was sobbing."),
        opt_tokenizer.encode(demo + "\n\nbecause I was laughing."),
    ]

    effect = Case("Copa", data_dir, eval_position=0)
    encodings, _ = effect.encode(opt_tokenizer, demos=False)
    assert encodings == [
        opt_tokenizer.encode("The man turned on the faucet so the toilet filled with water."),
        opt_tokenizer.encode("The man turned on the faucet so water flowed from the spout."),
    ]
    encodings, lens = effect.encode(opt_tokenizer, sfc=True)
    assert encodings == [
        opt_tokenizer.encode("so the toilet filled with water."),
        opt_tokenizer.encode("so water flowed from the spout."),
    ]
    assert lens == [
        len(opt_tokenizer.encode(t)) - 2
        for t in ("so the toilet filled with water.", "so water flowed from the spout.")
    ]


def test_literal_copa_choice_casing_edge_cases(data_dir, opt_tokenizer):
    # Spec §3 Copa: "I'm" is lower-cased (first piece is not exactly "I"); a leading space keeps the capital;
    # only one final period of the premise goes, and trailing spaces before it are removed first.
    task = load_task("Copa", str(data_dir))
    data = {
        "premise": "It rained.. ",
        "question": "effect",
        "choice1": "I'm Wet.",
        "choice2": " Nobody Came.",
    }
    sample = tasks.Sample(
        id=0, data=data, correct_candidate="I'm Wet.", candidates=["I'm Wet.", " Nobody Came."]
    )
    encodings, _ = encode_prompt(task, task.get_template(), [], sample, opt_tokenizer, BIG)
    assert encodings == [
        opt_tokenizer.encode("It rained. so i'm Wet."),
        opt_tokenizer.encode("It rained. so  Nobody Came."),
    ]


def test_literal_wsc_boolq_record(data_dir, opt_tokenizer):
    wsc = Case("WSC", data_dir)
    encodings, lens = wsc.encode(opt_tokenizer, demos=False)
    prompt = (
        "The customer walked into the bank and stabbed one of the tellers. He was immediately taken to the "
        'hospital.\nIn the previous sentence, does the pronoun "he" refer to The customer? Yes or No?\n'
    )
    assert encodings == [opt_tokenizer.encode(prompt + "No"), opt_tokenizer.encode(prompt + "Yes")]

    boolq = Case("BoolQ", data_dir)
    encodings, _ = boolq.encode(opt_tokenizer, demos=False)
    passage = boolq.row["passage"]
    suffix = " Does ethanol take more energy make that produces?\n"
    assert encodings == [opt_tokenizer.encode(passage + suffix + c) for c in ("Yes", "No")]
    # A question that already ends with "?" gets no second one.
    data = {"passage": "P.", "question": "is it?", "answer": True}
    sample = tasks.Sample(data=data, correct_candidate="Yes", candidates=["Yes", "No"])
    encodings, _ = encode_prompt(boolq.task, boolq.template, [], sample, opt_tokenizer, BIG)
    assert encodings == [opt_tokenizer.encode("P. Is it?\nYes"), opt_tokenizer.encode("P. Is it?\nNo")]

    record = Case("ReCoRD", data_dir)
    encodings, lens = record.encode(opt_tokenizer, demos=False)
    assert "@highlight" not in record.row["passage"].replace("@highlight\n", "")
    passage = record.row["passage"].replace("@highlight\n", "- ")
    assert passage.endswith(
        "\n- First episode of new SNL season will be hosted by Miley Cyrus, followed by Amy Schumer"
    )
    query = (
        "On October 10, acclaimed comedian and star of the summer box office hit Trainwreck Amy Schumer will "
        "make her SNL debut, followed by {} a week later."
    )
    entities = record.row["entities"]
    assert len(encodings) == len(entities) == 14
    assert encodings[5] == opt_tokenizer.encode(passage + "\n- " + query.format("Morgan"))
    prompt_len = len(opt_tokenizer.encode(passage + "\n-"))
    assert lens[5] == len(opt_tokenizer.encode(passage + "\n- " + query.format("Morgan"))) - prompt_len


def test_literal_squad_and_drop_generation(data_dir, opt_tokenizer):
    squad = Case("SQuAD", data_dir)
    head = "Title: Super_Bowl_50\nContext: " + squad.row["context"] + "\nQuestion: "
    prompt = head + "What was the final score of Super Bowl 50?\nAnswer:"
    encodings, lens = squad.encode(opt_tokenizer, demos=False, generation=True, max_new_tokens=50)
    assert (encodings, lens) == ([opt_tokenizer.encode(prompt)], [0])
    encodings, lens = squad.encode(
        opt_tokenizer, demos=False, generation=True, generation_with_gold=True, max_new_tokens=50
    )
    gold = prompt + " 24–10\n"  # trim_sp keeps the final line feed
    assert encodings == [opt_tokenizer.encode(gold)]
    assert lens == [len(opt_tokenizer.encode(gold)) - len(opt_tokenizer.encode(prompt))]
    assert opt_tokenizer.encode(gold)[-1] == opt_tokenizer.encode("\n", add_special_tokens=False)[-1]

    drop = Case("DROP", data_dir)
    assert drop.row["passage"].startswith(" Hoping")
    prompt = (
        "Passage: " + drop.row["passage"] + "\nQuestion: Who scored the first touchdown of the game?\nAnswer:"
    )
    encodings, _ = drop.encode(opt_tokenizer, demos=False, generation=True, generation_with_gold=True)
    assert encodings == [opt_tokenizer.encode(prompt + " Chaz Schilens\n")]


# ---------------------------------------------------------------------------------------------------------
# Every task, both tokenizers, against the builders


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_zero_shot(name, data_dir, tokenizer):
    case = Case(name, data_dir)
    encodings, lens = case.encode(tokenizer, demos=False)
    assert (encodings, lens) == case.expected(tokenizer, demos=False)
    assert len(encodings) == len(case.sample.candidates)
    assert all(n > 0 for n in lens)


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_with_demos(name, data_dir, tokenizer):
    case = Case(name, data_dir)
    encodings, lens = case.encode(tokenizer)
    assert (encodings, lens) == case.expected(tokenizer)
    # Demos change the text, never the option lengths (computed without demos).
    assert lens == case.encode(tokenizer, demos=False)[1]
    assert all(
        len(e) > len(z) for e, z in zip(encodings, case.encode(tokenizer, demos=False)[0], strict=True)
    )


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_sfc_drops_demos(name, data_dir, tokenizer):
    case = Case(name, data_dir)
    encodings, lens = case.encode(tokenizer, sfc=True)
    assert (encodings, lens) == case.expected(tokenizer, sfc=True)
    assert (encodings, lens) == case.encode(tokenizer, demos=False, sfc=True)


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classification_icl_sfc_keeps_demos(name, data_dir, tokenizer):
    case = Case(name, data_dir)
    encodings, lens = case.encode(tokenizer, icl_sfc=True)
    assert (encodings, lens) == case.expected(tokenizer, icl_sfc=True)
    assert lens == case.encode(tokenizer, sfc=True)[1]
    first = case.demo_rows[0]
    block = tokenizer.encode(spec_verbalize(name, first, spec_correct(name, first)).strip())
    assert all(e[: len(block) - 1] == block[:-1] for e in encodings)  # starts with the first demo


@pytest.mark.parametrize("demos", [False, True])
@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_generation_prompts(name, demos, data_dir, tokenizer):
    case = Case(name, data_dir)
    encodings, lens = case.encode(tokenizer, demos=demos, generation=True, max_new_tokens=50)
    assert (encodings, lens) == case.expected(tokenizer, demos=demos, generation=True)
    assert lens == [0]
    answer_ids = tokenizer.encode("Answer:", add_special_tokens=False)
    assert encodings[0][-len(answer_ids) :] == answer_ids

    flags = dict(generation=True, generation_with_gold=True, max_new_tokens=50)
    encodings, lens = case.encode(tokenizer, demos=demos, **flags)
    assert (encodings, lens) == case.expected(tokenizer, demos=demos, generation=True, with_gold=True)
    assert lens[0] > 0
    assert encodings[0][-1] == tokenizer.encode("\n", add_special_tokens=False)[-1]


@pytest.mark.parametrize("flag", ["sfc", "icl_sfc"])
@pytest.mark.parametrize("name", GENERATION_TASKS)
def test_generation_rejects_calibration(name, flag, data_dir, opt_tokenizer):
    case = Case(name, data_dir)
    with pytest.raises(UsageError):
        case.encode(opt_tokenizer, generation=True, **{flag: True})


# ---------------------------------------------------------------------------------------------------------
# Truncation (§4.7)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_truncation_keeps_bos_and_end(name, data_dir, tokenizer):
    case = Case(name, data_dir)
    adds_bos = tokenizer.encode("a") != tokenizer.encode("a", add_special_tokens=False)
    assert tokenizer_adds_bos(tokenizer) == adds_bos
    limit = 24
    if name in GENERATION_TASKS:
        flags_list = [
            dict(generation=True, max_new_tokens=50),
            dict(generation=True, generation_with_gold=True, max_new_tokens=50),
        ]
        max_length = limit + 50
        spec_flags = [dict(generation=True), dict(generation=True, with_gold=True)]
    else:
        # max_new_tokens only counts for generation: here the limit stays max_length.
        flags_list = [dict(), dict(icl_sfc=True), dict(max_new_tokens=10)]
        max_length = limit
        spec_flags = [dict(), dict(icl_sfc=True), dict()]
    for flags, spec in zip(flags_list, spec_flags, strict=True):
        full, lens = case.expected(tokenizer, **spec)
        assert all(len(ids) > limit for ids in full)
        encodings, got_lens = case.encode(tokenizer, max_length=max_length, **flags)
        assert got_lens == lens  # option lengths are not changed by truncation
        assert encodings == [spec_truncate(ids, limit, adds_bos) for ids in full]
        assert all(len(ids) == limit for ids in encodings)
        if adds_bos:
            assert all(
                ids[0] == tokenizer.bos_token_id and ids[1:] == f[-(limit - 1) :]
                for ids, f in zip(encodings, full, strict=True)
            )
        else:
            assert all(ids == f[-limit:] for ids, f in zip(encodings, full, strict=True))


def test_generation_limit_without_max_new_tokens(data_dir, tokenizer):
    case = Case("DROP", data_dir)
    full, _ = case.expected(tokenizer, generation=True)
    encodings, _ = case.encode(tokenizer, max_length=30, generation=True)
    assert encodings == [spec_truncate(full[0], 30, tokenizer_adds_bos(tokenizer))]
    assert len(encodings[0]) == 30


def test_no_truncation_at_exact_length(data_dir, tokenizer):
    case = Case("RTE", data_dir)
    full, _ = case.expected(tokenizer)
    longest = max(map(len, full))
    assert case.encode(tokenizer, max_length=longest)[0] == full
    shorter = case.encode(tokenizer, max_length=longest - 1)[0]
    assert max(map(len, shorter)) == longest - 1


@pytest.mark.parametrize(
    ("max_length", "max_new_tokens", "bos_result", "plain_result"),
    [
        # M = 1: with BOS K = 0 keeps everything; without, K = 1 keeps the last id.
        (51, 50, "all", "last1"),
        # M = 0: with BOS K = -1 drops the first non-BOS id; without, K = 0 keeps everything.
        (50, 50, "drop1", "all"),
        # M = -2: with BOS K = -3 drops 3 non-BOS ids; without, K = -2 drops the first 2 ids.
        (48, 50, "drop3", "drop2"),
    ],
)
def test_truncation_edge_cases_generation(
    max_length, max_new_tokens, bos_result, plain_result, data_dir, tokenizer
):
    case = Case("SQuAD", data_dir)
    full = case.expected(tokenizer, demos=False, generation=True)[0][0]
    encodings, lens = case.encode(
        tokenizer, demos=False, max_length=max_length, generation=True, max_new_tokens=max_new_tokens
    )
    adds_bos = tokenizer_adds_bos(tokenizer)
    result = bos_result if adds_bos else plain_result
    head, body = (full[:1], full[1:]) if adds_bos else ([], full)
    expected = {
        "all": full,
        "last1": full[-1:],
        "drop1": head + body[1:],
        "drop2": head + body[2:],
        "drop3": head + body[3:],
    }[result]
    assert encodings == [expected]
    assert lens == [0]


@pytest.mark.parametrize("max_length", [0, 1, 2])
def test_truncation_edge_cases_classification(max_length, data_dir, tokenizer):
    case = Case("CB", data_dir)
    full, lens = case.expected(tokenizer, demos=False)
    encodings, got_lens = case.encode(tokenizer, demos=False, max_length=max_length)
    assert got_lens == lens
    assert encodings == [spec_truncate(ids, max_length, tokenizer_adds_bos(tokenizer)) for ids in full]
    if tokenizer_adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
        expected = {0: [f[:1] + f[2:] for f in full], 1: full, 2: [[bos, f[-1]] for f in full]}[max_length]
    else:
        expected = {0: full, 1: [f[-1:] for f in full], 2: [f[-2:] for f in full]}[max_length]
    assert encodings == expected


# ---------------------------------------------------------------------------------------------------------
# Which tokenizers add a BOS (§9)


def test_tokenizer_adds_bos_plain_cases(opt_tokenizer, smol_tokenizer):
    assert opt_tokenizer.encode("a")[0] == 2
    assert tokenizer_adds_bos(opt_tokenizer) is True
    assert smol_tokenizer.encode("a") == smol_tokenizer.encode("a", add_special_tokens=False)
    assert tokenizer_adds_bos(smol_tokenizer) is False


def test_tokenizer_adds_bos_reads_encode_not_attribute(smollm2_dir, data_dir):
    # The transformers-5 pitfall: the post-processor prepends BOS id 1 while add_bos_token reads false.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    assert not getattr(tokenizer, "add_bos_token", False)
    assert tokenizer.encode("a")[0] == bos_id == 1
    assert tokenizer_adds_bos(tokenizer) is True

    case = Case("RTE", data_dir)
    full, lens = case.expected(tokenizer)
    assert all(ids[0] == 1 and 1 not in ids[1:] for ids in full)
    encodings, got_lens = case.encode(tokenizer, max_length=16)
    assert got_lens == lens
    assert encodings == [[1] + ids[-15:] for ids in full]


def test_tokenizer_adds_bos_false_when_encode_adds_nothing(data_dir):
    # The reverse: add_bos_token reads true but the post-processor adds nothing; keep the last M ids.
    tokenizer = build_opt_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    assert tokenizer.add_bos_token
    assert tokenizer.encode("a") == tokenizer.encode("a", add_special_tokens=False)
    assert tokenizer_adds_bos(tokenizer) is False

    case = Case("RTE", data_dir)
    full, _ = case.expected(tokenizer)
    encodings, _ = case.encode(tokenizer, max_length=16)
    assert encodings == [ids[-16:] for ids in full]


def test_tokenizer_adds_bos_after_opt_bos_id_override(data_dir):
    tokenizer = build_opt_tokenizer()
    tokenizer.bos_token_id = 0  # what the reference does for OPT after loading (§9)
    assert tokenizer.encode("a")[0] == 2 and tokenizer.encode("a", add_special_tokens=False)[0] != 2
    case = Case("RTE", data_dir)
    full, _ = case.expected(tokenizer)
    encodings, _ = case.encode(tokenizer, max_length=16)
    assert encodings == [ids[:1] + ids[-15:] for ids in full]
