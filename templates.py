"""Prompt templates for the 11 MeZO tasks (spec: shared/spec/TASKS.md, sections 2 and 3).

Each template turns a `tasks.Sample` into text four ways:
  encode(sample)                   prompt without an answer
  verbalize(sample, candidate)     prompt followed by that candidate's answer text
  encode_sfc(sample)               calibration prompt (usually without the input)
  verbalize_sfc(sample, candidate) calibration prompt followed by the answer text
The strings must match MeZO's character for character, because they decide the token ids.
"""

from utils import UsageError


class Template:
    """Default shape: the answer word is appended directly to the prompt; calibration uses the word alone."""

    # Maps a candidate (a class id) to the word the model scores; None means the candidate is the text.
    verbalizer = None

    def label_word(self, candidate):
        return candidate if self.verbalizer is None else self.verbalizer[candidate]

    def encode(self, sample):
        raise NotImplementedError

    def verbalize(self, sample, candidate):
        return self.encode(sample) + self.label_word(candidate)

    def encode_sfc(self, sample):
        return ""

    def verbalize_sfc(self, sample, candidate):
        return self.label_word(candidate)


class SST2Template(Template):
    verbalizer = {0: "terrible", 1: "great"}

    def encode(self, sample):
        # GLUE sentences end with a space, which would otherwise double the space before "It".
        return f"{sample.data['sentence'].strip()} It was"

    def verbalize(self, sample, candidate):
        return f"{self.encode(sample)} {self.label_word(candidate)}"

    def encode_sfc(self, sample):
        return " It was"

    def verbalize_sfc(self, sample, candidate):
        return f" It was {self.label_word(candidate)}"


class RTETemplate(Template):
    verbalizer = {0: "Yes", 1: "No"}

    def encode(self, sample):
        premise, hypothesis = sample.data["premise"], sample.data["hypothesis"]
        return f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


class CBTemplate(Template):
    verbalizer = {0: "Yes", 1: "No", 2: "Maybe"}

    def encode(self, sample):
        premise, hypothesis = sample.data["premise"], sample.data["hypothesis"]
        return f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'


def boolq_question(question):
    """MeZO's BoolQ question: ensure a final '?', then upper-case the first character only."""
    if not question.endswith("?"):
        question += "?"
    return question[0].upper() + question[1:]


class BoolQTemplateV3(Template):
    """MeZO's default BoolQ template (its third variant): passage, question, newline, answer."""

    separator = "\n"

    def encode(self, sample):
        return f"{sample.data['passage']} {boolq_question(sample.data['question'])}{self.separator}"


class BoolQTemplate(BoolQTemplateV3):
    """MeZO's first BoolQ variant: no newline; a space separates the question from the answer."""

    separator = ""

    def verbalize(self, sample, candidate):
        return f"{self.encode(sample)} {candidate}"


class BoolQTemplateV2(BoolQTemplateV3):
    """MeZO's second BoolQ variant: a literal backslash-n, twice (not line feeds), as the reference has it."""

    separator = "\\n\\n"


class WSCTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def encode(self, sample):
        text, noun = sample.data["text"], sample.data["span1_text"]
        pronoun = sample.data["span2_text"].lower()
        return f'{text}\nIn the previous sentence, does the pronoun "{pronoun}" refer to {noun}? Yes or No?\n'


class WICTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def encode(self, sample):
        word, first, second = sample.data["word"], sample.data["sentence1"], sample.data["sentence2"]
        return (
            f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
            f"{first}\n{second}\n"
        )


class MultiRCTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def encode(self, sample):
        paragraph, question, answer = (sample.data[key] for key in ("paragraph", "question", "answer"))
        return (
            f"{paragraph}\nQuestion: {question}\n"
            f'I found this answer "{answer}". Is that correct? Yes or No?\n'
        )


def copa_choice_case(choice):
    """Lower-case the first space-separated piece unless it is exactly "I" (so "I'm" becomes "i'm").

    A choice that starts with a space has an empty first piece, so its first word keeps its capital.
    """
    pieces = choice.split(" ")
    if pieces[0] != "I":
        pieces[0] = pieces[0].lower()
    return " ".join(pieces)


class CopaTemplate(Template):
    connectors = {"effect": "so", "cause": "because"}

    def connector(self, sample):
        question = sample.data["question"]
        if question not in self.connectors:
            raise UsageError(
                f"Copa question must be 'cause' or 'effect', got {question!r}; fix that row of the Copa data"
            )
        return self.connectors[question]

    def premise(self, sample):
        # Only one final period goes: the connector continues the sentence.
        premise = sample.data["premise"].rstrip()
        return premise[:-1] if premise.endswith(".") else premise

    def encode(self, sample):
        return f"{self.premise(sample)} {self.connector(sample)} "

    def verbalize(self, sample, candidate):
        return self.encode(sample) + copa_choice_case(candidate)

    def encode_sfc(self, sample):
        return self.connector(sample)

    def verbalize_sfc(self, sample, candidate):
        return f"{self.connector(sample)} {copa_choice_case(candidate)}"


class ReCoRDTemplateGPT3(Template):
    """MeZO's GPT-3 style ReCoRD prompt: highlights become "- " bullets, the option is the filled query."""

    def passage(self, sample):
        return sample.data["passage"].replace("@highlight\n", "- ")

    def filled_query(self, sample, candidate):
        # The gold answers arrive as a list (demonstrations); the first one is used.
        entity = candidate[0] if isinstance(candidate, list) else candidate
        return sample.data["query"].replace("@placeholder", entity)

    def encode(self, sample):
        return f"{self.passage(sample)}\n-"

    def verbalize(self, sample, candidate):
        return f"{self.passage(sample)}\n- {self.filled_query(sample, candidate)}"

    def encode_sfc(self, sample):
        return "-"

    def verbalize_sfc(self, sample, candidate):
        return f"- {self.filled_query(sample, candidate)}"


class GenerationTemplate(Template):
    """Generation tasks answer with free text: the answer shown is always the first gold."""

    task_name = None

    def verbalize(self, sample, candidate):
        return f"{self.encode(sample)} {sample.data['answers'][0]}\n"

    def encode_sfc(self, sample):
        raise UsageError(f"{self.task_name} has no calibration prompt; run it without --sfc / --icl_sfc")

    def verbalize_sfc(self, sample, candidate):
        return self.encode_sfc(sample)


class SQuADv2Template(GenerationTemplate):
    task_name = "SQuAD"

    def encode(self, sample):
        title, context = sample.data["title"], sample.data["context"]
        return f"Title: {title}\nContext: {context}\nQuestion: {sample.data['question'].strip()}\nAnswer:"


class DROPTemplate(GenerationTemplate):
    task_name = "DROP"

    def encode(self, sample):
        return f"Passage: {sample.data['passage']}\nQuestion: {sample.data['question'].strip()}\nAnswer:"
