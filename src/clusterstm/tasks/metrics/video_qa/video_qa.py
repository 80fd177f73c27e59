"""Open-ended video question answering accuracy (overall and per question type).

A self-contained `evaluate` metric module (loads offline with `evaluate.load("<path to this folder>")`).
Answers are compared after light normalisation (lower case, stripped, inner whitespace collapsed) when they are
strings; integer class ids are compared as is. Accuracy is in percent (0-100), as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Video QA accuracy (percent), overall and per question type when types are given."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): predicted answers.
    references (`list[str]`): ground-truth answers.
    question_types (`list[str]`, *optional*): a type per question (e.g. what/who/how); adds `accuracy_<type>` keys.
    normalize (`bool`, defaults to `True`): lower-case and collapse whitespace before comparing strings.
Returns:
    `accuracy` (percent), `num_samples`, and `accuracy_<type>` / `num_samples_<type>` per question type.
Examples:
    >>> metric = evaluate.load("src/clusterstm/tasks/metrics/video_qa")
    >>> metric.compute(predictions=["dog", "cat"], references=["dog", "car"])["accuracy"]
    50.0
"""


def _normalize_answer(answer, normalize: bool):
    if isinstance(answer, str) and normalize:
        return " ".join(answer.lower().split())
    if hasattr(answer, "item"):
        return answer.item()
    return answer


def qa_accuracy(
    predictions: Sequence,
    references: Sequence,
    question_types: Sequence[str] | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    """Accuracy (percent) of predicted answers, overall and per question type.

    Args:
        predictions: predicted answers (strings or class ids).
        references: ground-truth answers, same length.
        question_types: optional type of every question.
        normalize: normalise strings (case, whitespace) before comparing.

    Returns:
        `{"accuracy", "num_samples"}` plus `accuracy_<type>` and `num_samples_<type>` for each type.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("qa_accuracy needs at least one prediction")
    correct = np.asarray(
        [_normalize_answer(p, normalize) == _normalize_answer(r, normalize) for p, r in zip(predictions, references)]
    )
    out: dict[str, float] = {"accuracy": float(100.0 * correct.mean()), "num_samples": int(correct.size)}
    if question_types is not None:
        question_types = [str(t) for t in question_types]
        if len(question_types) != len(predictions):
            raise ValueError(f"got {len(question_types)} question types for {len(predictions)} predictions")
        types = np.asarray(question_types)
        for qtype in sorted(set(question_types)):
            sel = types == qtype
            out[f"accuracy_{qtype}"] = float(100.0 * correct[sel].mean())
            out[f"num_samples_{qtype}"] = int(sel.sum())
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoQa(evaluate.Metric):
    """`evaluate` wrapper of `qa_accuracy`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, question_types=None, normalize: bool = True) -> dict[str, float]:
        return qa_accuracy(predictions, references, question_types=question_types, normalize=normalize)
