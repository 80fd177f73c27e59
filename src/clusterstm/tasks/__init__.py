"""Downstream tasks: one module per task (its dataset kind, head, training targets, metrics, evaluation and
baselines), in the registry [`TASKS`] that fine-tuning, checkpoint export, model cards and the benchmarks read.

Adding a task: a new module here defining `TASK = DownstreamTask(...)` (see `tasks/base.py`) and one entry below.
"""

from __future__ import annotations

from .base import DownstreamTask
from .captioning import TASK as _CAPTIONING
from .qa import TASK as _QA
from .retrieval import TASK as _RETRIEVAL

TASKS: dict[str, DownstreamTask] = {task.name: task for task in (_RETRIEVAL, _QA, _CAPTIONING)}


def get_task(name: str) -> DownstreamTask:
    """The registered task `name`; `ValueError` listing the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


__all__ = ["TASKS", "DownstreamTask", "get_task"]
