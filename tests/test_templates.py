"""templates.py: every task's four prompt functions, string for string, on real rows (spec sections 2-3).

Expected strings are built here from the spec's format rules and the raw row fields, and a few are
written out in full.
"""

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

import tasks
import templates
from utils import UsageError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@cache
def load(task_name):
    return tasks.get_task(task_name, data_dir=DATA_DIR)


def valid(task_name, position):
    return load(task_name).valid_samples[position]


def train(task_name, position):
    return load(task_name).samples["train"][position]


def with_data(sample, **changes):
    """A copy of a real sample with some fields changed, to reach rules the real rows never hit."""
    return replace(sample, data={**sample.data, **changes})


def assert_four(template, sample, encode, verbalized, encode_sfc, verbalized_sfc):
    """`verbalized` / `verbalized_sfc` map each candidate to its expected text."""
    assert template.encode(sample) == encode
    assert template.encode_sfc(sample) == encode_sfc
    for candidate, text in verbalized.items():
        assert template.verbalize(sample, candidate) == text
    for candidate, text in verbalized_sfc.items():
        assert template.verbalize_sfc(sample, candidate) == text


# --- classification tasks ------------------------------------------------------------------------


def test_sst2_strips_the_sentence():
    sample = valid("SST2", 0)
    assert sample.data["sentence"].endswith(" ")
    text = "it 's a charming and often affecting journey ."
    assert_four(
        load("SST2").get_template(),
        sample,
        f"{text} It was",
        {0: f"{text} It was terrible", 1: f"{text} It was great"},
        " It was",
        {0: " It was terrible", 1: " It was great"},
    )


def test_rte():
    sample = valid("RTE", 0)
    premise, hypothesis = sample.data["premise"], sample.data["hypothesis"]
    prompt = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
    assert prompt.endswith('that "Christopher Reeve had an accident." is true? Yes or No?\n')
    assert_four(
        load("RTE").get_template(),
        sample,
        prompt,
        {0: prompt + "Yes", 1: prompt + "No"},
        "",
        {0: "Yes", 1: "No"},
    )


def test_cb_fully_literal():
    sample = valid("CB", 1)
    prompt = (
        "Suppose ``Who knows? The point is, do we go with it or not?'' Do we assume there is a shipment? "
        'Can we infer that "there is a shipment"? Yes, No, or Maybe?\n'
    )
    words = {0: "Yes", 1: "No", 2: "Maybe"}
    assert_four(
        load("CB").get_template(),
        sample,
        prompt,
        {label: prompt + word for label, word in words.items()},
        "",
        words,
    )


def test_boolq_default_template_appends_question_mark_and_capitalises():
    sample = valid("BoolQ", 0)
    assert sample.data["question"] == "does ethanol take more energy make that produces"
    prompt = f"{sample.data['passage']} Does ethanol take more energy make that produces?\n"
    assert_four(
        load("BoolQ").get_template(),
        sample,
        prompt,
        {"Yes": prompt + "Yes", "No": prompt + "No"},
        "",
        {"Yes": "Yes", "No": "No"},
    )


def test_boolq_question_rules():
    template = templates.BoolQTemplateV3()
    sample = with_data(valid("BoolQ", 0), passage="P.", question="is NASA in texas?")
    assert template.encode(sample) == "P. Is NASA in texas?\n"  # no second '?', only the first char changes


def test_boolq_other_variants():
    sample = with_data(valid("BoolQ", 0), passage="P.", question="is it")
    first = templates.BoolQTemplate()
    assert first.encode(sample) == "P. Is it?"
    assert first.verbalize(sample, "Yes") == "P. Is it? Yes"
    second = templates.BoolQTemplateV2()
    assert second.encode(sample) == "P. Is it?" + "\\" + "n" + "\\" + "n"
    assert second.verbalize(sample, "No") == "P. Is it?\\n\\nNo"
    for variant in (first, second):
        assert (variant.encode_sfc(sample), variant.verbalize_sfc(sample, "No")) == ("", "No")


def test_wsc_lower_cases_the_pronoun_only():
    sample = train("WSC", 0)
    assert (sample.data["span1_text"], sample.data["span2_text"]) == ("Mark", "He")
    prompt = (
        f'{sample.data["text"]}\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n'
    )
    assert_four(
        load("WSC").get_template(),
        sample,
        prompt,
        {0: prompt + "No", 1: prompt + "Yes"},
        "",
        {0: "No", 1: "Yes"},
    )


def test_wic_fully_literal():
    prompt = (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\n"
        "Apologizing for losing your temper, even though you were badly provoked, showed real class.\n"
    )
    assert_four(
        load("WIC").get_template(),
        valid("WIC", 0),
        prompt,
        {0: prompt + "No", 1: prompt + "Yes"},
        "",
        {0: "No", 1: "Yes"},
    )


def test_multirc_keeps_the_paragraph_untouched():
    sample = valid("MultiRC", 0)
    paragraph = sample.data["paragraph"]
    assert paragraph.endswith(" ")
    prompt = (
        f"{paragraph}\n"
        "Question: Would the mass of a baseball affect how much force you have to use to pick it up?\n"
        'I found this answer "No". Is that correct? Yes or No?\n'
    )
    assert_four(
        load("MultiRC").get_template(),
        sample,
        prompt,
        {0: prompt + "No", 1: prompt + "Yes"},
        "",
        {0: "No", 1: "Yes"},
    )


# --- Copa --------------------------------------------------------------------------------------------


def test_copa_effect_fully_literal():
    sample = valid("Copa", 0)
    assert_four(
        load("Copa").get_template(),
        sample,
        "The man turned on the faucet so ",
        {
            "The toilet filled with water.": "The man turned on the faucet so the toilet filled with water.",
            "Water flowed from the spout.": "The man turned on the faucet so water flowed from the spout.",
        },
        "so",
        {"Water flowed from the spout.": "so water flowed from the spout."},
    )


def test_copa_cause_keeps_capital_i():
    sample = train("Copa", 6)
    assert (sample.data["question"], sample.correct_candidate) == ("cause", "I bleached the shirt.")
    template = load("Copa").get_template()
    assert template.verbalize(sample, sample.correct_candidate) == (
        "The stain came out of the shirt because I bleached the shirt."
    )
    assert template.encode_sfc(sample) == "because"
    assert template.verbalize_sfc(sample, "I patched the shirt.") == "because I patched the shirt."


def test_copa_choice_with_leading_space_keeps_its_capital():
    sample = train("Copa", 128)
    assert sample.candidates[0] == " The driver talked the whole way."
    assert load("Copa").get_template().verbalize(sample, sample.candidates[0]) == (
        "The trip took a long time because  The driver talked the whole way."
    )


def test_copa_premise_trailing_space_and_period_go():
    sample = train("Copa", 209)
    assert sample.data["premise"].endswith(". ")
    assert load("Copa").get_template().encode(sample) == (
        "The parents forbade their children from watching the movie because "
    )


def test_copa_casing_and_punctuation_rules():
    template = templates.CopaTemplate()
    sample = with_data(valid("Copa", 0), premise="It rained!")
    assert template.encode(sample) == "It rained! so "
    assert template.verbalize(sample, "I'm wet.") == "It rained! so i'm wet."
    assert template.verbalize(sample, "I stayed in.") == "It rained! so I stayed in."
    assert template.encode(with_data(sample, premise="Wait..")) == "Wait. so "


def test_copa_unknown_question_is_an_error():
    sample = with_data(valid("Copa", 0), question="reason")
    with pytest.raises(UsageError, match="'cause' or 'effect'"):
        templates.CopaTemplate().encode(sample)


# --- ReCoRD ------------------------------------------------------------------------------------------


def test_record_bullets_and_filled_query():
    sample = valid("ReCoRD", 0)
    passage = sample.data["passage"].replace("@highlight\n", "- ")
    assert "@highlight" not in passage
    assert passage.endswith(
        "friend\n- First episode of new SNL season will be hosted by Miley Cyrus, followed by Amy Schumer"
    )
    query = (
        "On October 10, acclaimed comedian and star of the summer box office hit Trainwreck Amy Schumer "
        "will make her SNL debut, followed by {} a week later."
    )
    assert sample.data["query"] == query.format("@placeholder")
    assert_four(
        load("ReCoRD").get_template(),
        sample,
        f"{passage}\n-",
        {
            "Tracy Morgan": f"{passage}\n- {query.format('Tracy Morgan')}",
            "NBC": f"{passage}\n- {query.format('NBC')}",
        },
        "-",
        {"Morgan": f"- {query.format('Morgan')}"},
    )


def test_record_gold_list_uses_its_first_answer():
    sample = valid("ReCoRD", 0)
    template = load("ReCoRD").get_template()
    assert template.verbalize(sample, sample.correct_candidate) == template.verbalize(sample, "Morgan")


# --- generation tasks --------------------------------------------------------------------------------


def test_squad_trims_the_question_and_answers_with_the_first_gold():
    sample = valid("SQuAD", 19)
    assert sample.data["question"] == "What was the final score of Super Bowl 50? "
    prompt = (
        f"Title: Super_Bowl_50\nContext: {sample.data['context']}\n"
        "Question: What was the final score of Super Bowl 50?\nAnswer:"
    )
    template = load("SQuAD").get_template()
    assert template.encode(sample) == prompt
    assert template.verbalize(sample, sample.correct_candidate) == prompt + " 24–10\n"
    assert template.verbalize(sample, "anything") == prompt + " 24–10\n"


def test_drop_keeps_the_passage_and_answers_with_the_first_gold():
    sample = valid("DROP", 0)
    prompt = (
        f"Passage: {sample.data['passage']}\nQuestion: Who scored the first touchdown of the game?\nAnswer:"
    )
    assert prompt.startswith("Passage:  Hoping")
    template = load("DROP").get_template()
    assert template.encode(sample) == prompt
    assert template.verbalize(sample, sample.correct_candidate) == prompt + " Chaz Schilens\n"
    assert template.encode(with_data(sample, question="  Who?\n")).endswith("\nQuestion: Who?\nAnswer:")


@pytest.mark.parametrize("task_name", ["SQuAD", "DROP"])
def test_generation_tasks_have_no_sfc(task_name):
    sample = valid(task_name, 0)
    template = load(task_name).get_template()
    with pytest.raises(UsageError, match="sfc"):
        template.encode_sfc(sample)
    with pytest.raises(UsageError, match="sfc"):
        template.verbalize_sfc(sample, sample.correct_candidate)


# --- every task ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", list(tasks.TASKS))
def test_verbalize_extends_encode_for_demos_and_every_candidate(task_name):
    """A demonstration is verbalize(demo, demo.correct); every option text continues the prompt."""
    task = load(task_name)
    template = task.get_template()
    for sample in task.valid_samples[:20]:
        options = (
            [sample.correct_candidate] if task.generation else [sample.correct_candidate, *sample.candidates]
        )
        for candidate in options:
            assert template.verbalize(sample, candidate).startswith(template.encode(sample))
            if not task.generation:
                assert template.verbalize_sfc(sample, candidate).startswith(template.encode_sfc(sample))
