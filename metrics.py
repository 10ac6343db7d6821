"""Scores for the 11 MeZO tasks (spec: shared/spec/TASKS.md, section 7).

accuracy: classification / multiple choice, comparing candidate indices.
em, f1:   SQuAD-style answer normalisation and token F1 for the generation tasks (SQuAD, DROP).
"""

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

# No utils import here: utils re-exports Prediction from this module, so importing it back would be circular.

METRIC_NAMES = ("accuracy", "em", "f1")

# First golds that mean "the passage has no answer": scored all-or-nothing, never by token overlap.
NO_ANSWER_GOLDS = ("CANNOTANSWER", "no answer")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLE = re.compile(r"\b(a|an|the)\b")


@dataclass
class Prediction:
    """One evaluated sample: the gold (index, list of indices, or gold strings) and what the model chose."""

    correct_candidate: Any
    predicted_candidate: Any


def normalize_answer(text):
    """Lower-case, drop ASCII punctuation, blank out the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLE.sub(" ", text)
    return " ".join(text.split())


def _as_gold_list(golds):
    return [golds] if isinstance(golds, str) else list(golds)


def _token_f1(prediction_tokens, gold_tokens):
    common = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(pred, golds):
    """Best token F1 of `pred` over the gold strings (a list, or one string)."""
    golds = _as_gold_list(golds)
    if not golds:
        raise ValueError("f1 needs at least one gold answer per sample; got an empty list")
    normalized_pred = normalize_answer(pred)
    if golds[0] in NO_ANSWER_GOLDS:
        return float(normalized_pred == normalize_answer(golds[0]))
    prediction_tokens = normalized_pred.split()
    return max(_token_f1(prediction_tokens, normalize_answer(gold).split()) for gold in golds)


def exact_match(pred, golds):
    """1.0 if the normalised prediction equals any normalised gold, else 0.0."""
    normalized_pred = normalize_answer(pred)
    return float(any(normalize_answer(gold) == normalized_pred for gold in _as_gold_list(golds)))


def is_correct(prediction):
    """Accuracy of one sample; a list of correct indices (ReCoRD) accepts any of them."""
    correct = prediction.correct_candidate
    if isinstance(correct, list | tuple):
        return prediction.predicted_candidate in correct
    return prediction.predicted_candidate == correct


_SAMPLE_SCORES = {
    "accuracy": lambda prediction: float(is_correct(prediction)),
    "em": lambda prediction: exact_match(prediction.predicted_candidate, prediction.correct_candidate),
    "f1": lambda prediction: f1(prediction.predicted_candidate, prediction.correct_candidate),
}


def calculate_metric(predictions, metric_name):
    """Mean per-sample score of `predictions` (objects with correct_candidate / predicted_candidate)."""
    if metric_name not in _SAMPLE_SCORES:
        raise ValueError(f"unknown metric {metric_name!r}; use one of: {', '.join(METRIC_NAMES)}")
    if len(predictions) == 0:
        raise ValueError(f"cannot compute {metric_name} over zero predictions; evaluate at least one sample")
    score = _SAMPLE_SCORES[metric_name]
    return float(np.mean([score(prediction) for prediction in predictions]))
