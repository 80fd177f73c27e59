"""What a downstream task is, for everything that reads the task registry (`clusterstm.tasks.TASKS`).

Fine-tuning (`clusterstm.training.finetuning`), checkpoint export (`clusterstm.hub.export`), model cards
(`clusterstm.hub.model_card`) and the benchmarks ask a [`DownstreamTask`] for what differs between tasks instead of
testing task names. Adding a task is one new module in `clusterstm/tasks/` that defines a `TASK` and one entry in
`clusterstm.tasks.TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The kinds of records a task's datasets hold (`clusterstm.training.finetuning.VideoCaptions` / `VideoQuestions`).
RECORD_KINDS = ("captions", "questions")
# What a task trains its head on: the in-batch contrastive pairs, the answer classes, or the caption tokens.
TRAINING_TARGETS = ("contrastive", "answer_classes", "caption_tokens")
# How a task is evaluated: Trainer's own loop with `compute_metrics`, or one of the trainer's protocol loops.
EVALUATIONS = ("trainer", "retrieval", "captioning")


@dataclass(frozen=True)
class DownstreamTask:
    """
    One downstream task: its records, head, training targets, evaluation, baselines, Hub metadata and metrics.

    Args:
        name: the `--task` value.
        head_class_name: the head's class in `modeling_clusterstm` (remote code).
        records: which records its datasets hold, one of `RECORD_KINDS`.
        training_targets: what the head trains on, one of `TRAINING_TARGETS`.
        evaluation: how it is evaluated, one of `EVALUATIONS`.
        pipeline_tag: the Hub pipeline tag of a fine-tuned checkpoint's model card.
        auto_class: the transformers Auto class the head registers under (`None`: `AutoModel` only).
        card_metrics: metric key (as the metrics module reports it) -> (model-index metric type, display name).
        card_tasks: model-index task key -> (model-index task type, human name) its results are listed under.
        aliases: other names an eval result may give the task in a model card.
        baseline: `(train_records, eval_records, caption_tokenizer) -> dict`, reference numbers keyed `baseline_*`.
        check_dependencies: raises `ImportError` with the install command when evaluation needs a missing extra.
        headline: (metric key, label, baseline key, baseline label) of the benchmarks' one-line comparison, keys as
            fine-tuning reports them without the `eval_` prefix.
    """

    name: str
    head_class_name: str
    records: str
    training_targets: str
    evaluation: str
    pipeline_tag: str
    baseline: Callable[[Any, Any, str], dict[str, Any]]
    auto_class: str | None = None
    card_metrics: dict[str, tuple[str, str]] = field(default_factory=dict)
    card_tasks: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    check_dependencies: Callable[[], None] | None = None
    headline: tuple[str, str, str, str] | None = None

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.records, RECORD_KINDS, "records"),
            (self.training_targets, TRAINING_TARGETS, "training_targets"),
            (self.evaluation, EVALUATIONS, "evaluation"),
        ):
            if value not in allowed:
                raise ValueError(f"task {self.name!r}: {what} must be one of {allowed}, got {value!r}")

    def head_class(self) -> type:
        """The head's model class (from the remote-code modeling file)."""
        from ..models import modeling_clusterstm

        return getattr(modeling_clusterstm, self.head_class_name)

    def card_entries(self, metrics: dict[str, Any]) -> list[tuple[str, str, str, float]]:
        """(model-index task key, metric type, display name, value) of the task's metrics found in `metrics`
        (`eval_` / `test_` prefixes ignored); one card task: plain keys, several: keys prefixed `<card task>_`
        (and their `dsl_` dual-softmax copies)."""
        clean = {k.removeprefix("eval_").removeprefix("test_"): v for k, v in metrics.items()}
        entries = []
        if len(self.card_tasks) == 1:
            (card_task,) = self.card_tasks
            for key, (mtype, name) in self.card_metrics.items():
                if clean.get(key) is not None:
                    entries.append((card_task, mtype, name, clean[key]))
            return entries
        for card_task in self.card_tasks:
            for prefix, suffix in (("", ""), ("dsl_", " (dual-softmax)")):
                for key, (mtype, name) in self.card_metrics.items():
                    value = clean.get(f"{prefix}{card_task}_{key}")
                    if value is not None:
                        entries.append((card_task, mtype if not prefix else f"{mtype}_dsl", name + suffix, value))
        return entries
