"""Evaluation metrics for the ClusterSTM downstream tasks.

Each metric exists twice, with the same code underneath:

- as a plain function (`retrieval_metrics`, `qa_accuracy`, `caption_metrics`, plus the streaming
  `RetrievalRankAccumulator` and `retrieval_metrics_from_embeddings`), and
- as a local `evaluate` metric module that loads offline: `load_metric("retrieval")` returns
  `evaluate.load(<folder of this package>/retrieval)`. The module folders are self-contained (numpy, datasets,
  evaluate, pycocoevalcap) so they can be copied elsewhere and loaded with `evaluate.load(path)` as well.

Units: retrieval Recall@K and QA accuracy in percent, captioning scores as raw pycocoevalcap fractions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .captioning.captioning import caption_metrics, java_available, python_tokenize
from .retrieval.retrieval import (
    RetrievalRankAccumulator,
    dual_softmax_rerank,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    text_to_video_ranks,
    video_to_text_ranks,
)
from .video_qa.video_qa import qa_accuracy

METRICS_DIR = Path(__file__).resolve().parent

# Public names of the local metric modules (and a few aliases).
_METRIC_FOLDERS = {
    "retrieval": "retrieval",
    "video_qa": "video_qa",
    "qa": "video_qa",
    "captioning": "captioning",
    "caption": "captioning",
}


def metric_path(name: str) -> str:
    """Path of the folder of a local metric module (`retrieval`, `video_qa`/`qa`, `captioning`/`caption`)."""
    if name not in _METRIC_FOLDERS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(_METRIC_FOLDERS)}")
    return str(METRICS_DIR / _METRIC_FOLDERS[name])


def load_metric(name: str, **kwargs: Any):
    """`evaluate.load` of one of the local metric modules; works offline. `kwargs` go to `evaluate.load`."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = [
    "METRICS_DIR",
    "RetrievalRankAccumulator",
    "caption_metrics",
    "dual_softmax_rerank",
    "java_available",
    "load_metric",
    "metric_path",
    "python_tokenize",
    "qa_accuracy",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "text_to_video_ranks",
    "video_to_text_ranks",
]
