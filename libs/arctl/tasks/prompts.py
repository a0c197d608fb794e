"""Documents to items, with lm-evaluation-harness 0.4's zero-shot prompts (pure functions).

Each function takes one record as the shared data folder stores it and builds the same requests the
harness builds from the corresponding Hugging Face data set:

- ``lambada_openai``: context = all words but the last, continuation = ``" " + last word``
  (the text is split on single spaces, as the harness's template does).
- ``piqa``: ``"Question: {goal}\\nAnswer:"`` and the two solutions.
- ``arc_easy`` / ``arc_challenge``: ``"Question: {question}\\nAnswer:"`` and the choice texts; gold is
  the position of ``answerKey`` among the labels (letters or the digits some items use).
- ``hellaswag``: the harness's query is ``preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())``. The shared copy is llama.cpp's text form, which keeps ``activity_label +
  ": " + ctx`` already preprocessed but not the ``ctx_a``/``ctx_b`` split, so the first word of
  ``ctx_b`` stays as written (usually lower case) and the rest of ``ctx_b`` keeps its case where
  ``capitalize()`` would lower it. The endings are the preprocessed endings, as in the harness.
- ``winogrande``: partial scoring: one context per option (``sentence`` up to the blank, then the
  option), the same continuation (the rest of the sentence after the blank, stripped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from arctl.tasks.items import Item, multiple_choice, multiple_contexts


class RecordError(ValueError):
    """A record that does not have the fields or values a task needs."""


def _field(record: Mapping[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if not isinstance(value, kind):
        raise RecordError(f"field {name!r} missing or not a {kind.__name__}")
    return value


def lambada_item(text: str) -> Item:
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise RecordError("a LAMBADA text needs at least two words and a last word")
    return multiple_choice(" ".join(words[:-1]), [words[-1]], 0)


def piqa_item(record: Mapping[str, Any], label: int) -> Item:
    goal, sol1, sol2 = (_field(record, name, str) for name in ("goal", "sol1", "sol2"))
    if label not in (0, 1):
        raise RecordError(f"PIQA label {label!r} is not 0 or 1")
    return multiple_choice(f"Question: {goal}\nAnswer:", [sol1, sol2], label)


def arc_item(record: Mapping[str, Any]) -> Item:
    question = _field(record, "question", dict)
    stem = _field(question, "stem", str)
    choices: Sequence[Mapping[str, Any]] = _field(question, "choices", list)
    texts = [_field(choice, "text", str) for choice in choices]
    labels = [_field(choice, "label", str) for choice in choices]
    answer = _field(record, "answerKey", str)
    if answer not in labels:
        raise RecordError(f"answerKey {answer!r} is not one of the labels {labels}")
    return multiple_choice(f"Question: {stem}\nAnswer:", texts, labels.index(answer))


def hellaswag_item(query: str, label: int, endings: Sequence[str]) -> Item:
    if len(endings) != 4:
        raise RecordError(f"a HellaSwag task has 4 endings, not {len(endings)}")
    if not 0 <= label < 4:
        raise RecordError(f"HellaSwag label {label!r} is not 0..3")
    return multiple_choice(query, list(endings), label)


def winogrande_item(record: Mapping[str, Any]) -> Item:
    sentence, option1, option2, answer = (_field(record, name, str) for name in ("sentence", "option1", "option2", "answer"))
    if "_" not in sentence:
        raise RecordError("a WinoGrande sentence needs a blank '_'")
    if answer not in ("1", "2"):
        raise RecordError(f"WinoGrande answer {answer!r} is not '1' or '2'")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in (option1, option2)]
    return multiple_contexts(contexts, sentence[blank + 1 :].strip(), int(answer) - 1)
