"""metrics.py: SQuAD normalisation, token F1, exact match and accuracy, checked by hand (spec section 7)."""

import pytest

from metrics import Prediction, calculate_metric, exact_match, f1, normalize_answer


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("Super-Bowl 50", "superbowl 50"),
        ("1.3", "13"),
        ("An apple, a day", "apple day"),
        ("theater anatomy", "theater anatomy"),  # articles only as whole words
        ("  Tab\tand\nnewline ", "tab and newline"),
        ("24–10", "24–10"),  # the en dash is not ASCII punctuation
        ("the", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_f1_exact_and_partial_overlap():
    assert f1("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert f1("the Denver Broncos!", ["denver broncos"]) == 1.0
    # pred {denver, broncos, team} vs gold {denver, broncos}: P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8
    assert f1("the Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # pred {broncos} vs gold {denver, broncos}: P = 1, R = 1/2, F1 = 2/3
    assert f1("Broncos", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert f1("Carolina", ["Denver Broncos"]) == 0.0
    assert f1("", ["Denver Broncos"]) == 0.0


def test_f1_counts_repeated_tokens_as_a_multiset():
    # pred {go, go, go} vs gold {go}: common 1, P = 1/3, R = 1, F1 = 0.5
    assert f1("go go go", ["go"]) == pytest.approx(0.5)
    # pred {go, go} vs gold {go, go, stop}: common 2, P = 1, R = 2/3, F1 = 0.8
    assert f1("go go", ["go go stop"]) == pytest.approx(0.8)


def test_f1_is_the_best_over_golds():
    golds = ["Carolina Panthers", "Denver Broncos", "the Broncos"]
    assert f1("Broncos", golds) == 1.0
    assert f1("Denver", golds) == pytest.approx(2 / 3)
    assert f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)  # a single gold string


def test_no_answer_golds_are_all_or_nothing():
    assert f1("CANNOTANSWER.", ["CANNOTANSWER", "Denver"]) == 1.0
    assert f1("Denver", ["CANNOTANSWER", "Denver"]) == 0.0  # the other golds do not count
    assert f1("cannot answer", ["CANNOTANSWER"]) == 0.0
    assert f1("No answer!", ["no answer"]) == 1.0
    assert f1("no", ["no answer"]) == 0.0
    # Only the first gold decides the special case.
    assert f1("Denver", ["Denver", "CANNOTANSWER"]) == 1.0


def test_exact_match_uses_normalisation_and_any_gold():
    assert exact_match("The Denver Broncos.", ["Carolina", "denver broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    assert exact_match("superbowl 50", "Super-Bowl 50") == 1.0


def test_accuracy_on_candidate_indices():
    predictions = [Prediction(1, 1), Prediction(0, 1), Prediction(2, 2), Prediction(0, 0)]
    assert calculate_metric(predictions, "accuracy") == 0.75


def test_accuracy_with_several_correct_indices():
    predictions = [Prediction([0, 3], 3), Prediction([0, 3], 1), Prediction([2], 2), Prediction(1, 1)]
    assert calculate_metric(predictions, "accuracy") == 0.75


def test_em_and_f1_average_over_samples():
    predictions = [
        Prediction(["Denver Broncos", "Denver Broncos"], "the Denver Broncos"),
        Prediction(["Denver Broncos"], "Broncos"),
        Prediction(["24–10"], "24-10"),
    ]
    assert calculate_metric(predictions, "em") == pytest.approx(1 / 3)
    # 1, 2/3, and 0 ("24-10" loses its hyphen: "2410" against "24–10")
    assert calculate_metric(predictions, "f1") == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_calculate_metric_rejects_unknown_names_and_empty_input():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        calculate_metric([Prediction(0, 0)], "bleu")
    with pytest.raises(ValueError, match="zero predictions"):
        calculate_metric([], "accuracy")
    assert isinstance(calculate_metric([Prediction(0, 0)], "accuracy"), float)
