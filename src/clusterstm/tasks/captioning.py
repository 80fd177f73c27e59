"""Video captioning: a text decoder on the video tokens (`ClusterSTMForVideoCaptioning`) trained with teacher
forcing, evaluated by generating captions and scoring them with pycocoevalcap (BLEU-4, METEOR, ROUGE-L, CIDEr)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import DownstreamTask

CAPTIONING_INSTALL = "pip install 'clusterstm[captioning]'"


def check_captioning_dependencies() -> None:
    """Raise `ImportError` with the install command when the captioning metrics' optional dependency is missing.

    Called at start-up, so that a `--task captioning --do_eval` run never trains for hours and then fails to score.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # noqa: F401
        from pycocoevalcap.cider.cider import Cider  # noqa: F401
        from pycocoevalcap.rouge.rouge import Rouge  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"--task captioning with --do_eval scores captions with pycocoevalcap, which is not installed ({error}). "
            f"Install it with: {CAPTIONING_INSTALL}"
        ) from error


def video_colour_features(videos: Sequence[Any], bins: int = 8) -> np.ndarray:
    """A simple video descriptor: the colour histogram (`bins` per RGB channel) of all frames, L1-normalised."""
    feats = []
    for video in videos:
        if isinstance(video, (str, os.PathLike)):
            from ..models.video_processing_clusterstm import read_video_pyav

            video = read_video_pyav(video, 8, "uniform")
        array = np.asarray(video)
        if array.ndim == 3:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.shape[-1] != 3 and array.shape[1] == 3:
            array = np.moveaxis(array, 1, -1)
        array = array.reshape(-1, 3).astype(np.float64)
        if array.max() <= 1.0:
            array = array * 255.0
        hist = [np.histogram(array[:, c], bins=bins, range=(0, 256))[0] for c in range(3)]
        feat = np.concatenate(hist).astype(np.float64)
        feats.append(feat / max(feat.sum(), 1.0))
    return np.stack(feats) if feats else np.zeros((0, 3 * bins))


def nearest_neighbour_captions(train: Any, evaluation: Any, bins: int = 8) -> list[str]:
    """For every evaluation video, the first caption of the nearest training video (colour-histogram L2)."""
    train_feats = video_colour_features(train.videos, bins)
    eval_feats = video_colour_features(evaluation.videos, bins)
    predictions = []
    for feat in eval_feats:
        nearest = int(np.argmin(((train_feats - feat[None]) ** 2).sum(axis=1)))
        predictions.append(train.captions[nearest][0])
    return predictions


def nearest_neighbour_baseline(train_data: Any, eval_data: Any, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """The caption of the nearest training video in colour-histogram space, scored (keys `baseline_nn_*`)."""
    from .metrics import caption_metrics

    predictions = nearest_neighbour_captions(train_data, eval_data)
    out = caption_metrics(predictions, eval_data.captions, tokenizer=caption_tokenizer, meteor=False)
    return {f"baseline_nn_{k}": v for k, v in out.items()}


TASK = DownstreamTask(
    name="captioning",
    head_class_name="ClusterSTMForVideoCaptioning",
    records="captions",
    training_targets="caption_tokens",
    evaluation="captioning",
    pipeline_tag="video-text-to-text",
    auto_class="AutoModelForImageTextToText",
    card_metrics={
        "bleu_4": ("bleu", "BLEU-4"),
        "meteor": ("meteor", "METEOR"),
        "rouge_l": ("rouge", "ROUGE-L"),
        "cider": ("cider", "CIDEr"),
    },
    card_tasks={"captioning": ("video-captioning", "Video Captioning")},
    aliases=("captioning", "caption"),
    baseline=nearest_neighbour_baseline,
    headline=("cider", "CIDEr", "baseline_nn_cider", "nearest-neighbour caption"),
    check_dependencies=check_captioning_dependencies,
)
