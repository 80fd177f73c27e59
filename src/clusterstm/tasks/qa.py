"""Video question answering: a classifier over an answer vocabulary (`ClusterSTMForVideoQuestionAnswering`),
scored by accuracy (overall and per question type) with Trainer's own evaluation loop."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .base import DownstreamTask


def majority_answer_baseline(train_data: Any, eval_data: Any, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """Always answering the most frequent training answer: `baseline_majority_answer` and its accuracy (percent)."""
    from .metrics import qa_accuracy

    majority = Counter(train_data.answers).most_common(1)[0][0]
    out = qa_accuracy([majority] * len(eval_data), eval_data.answers)
    return {"baseline_majority_answer": majority, "baseline_majority_accuracy": out["accuracy"]}


TASK = DownstreamTask(
    name="qa",
    head_class_name="ClusterSTMForVideoQuestionAnswering",
    records="questions",
    training_targets="answer_classes",
    evaluation="trainer",
    pipeline_tag="visual-question-answering",
    auto_class="AutoModelForVisualQuestionAnswering",
    card_metrics={"accuracy": ("accuracy", "Accuracy")},
    card_tasks={"qa": ("video-question-answering", "Video Question Answering")},
    aliases=("qa", "video_qa"),
    baseline=majority_answer_baseline,
    headline=("accuracy", "QA accuracy (%)", "baseline_majority_accuracy", "majority answer"),
)
