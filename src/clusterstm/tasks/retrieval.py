"""Text-video retrieval: the one retrieval evaluator of the package.

Every zero-shot or fine-tuned retrieval number (pretraining's zero-shot check, fine-tuning's `Trainer.evaluate`, the
teacher's frame-text check, the ablations, the downstream benchmark and the demo) is ranked here, by the metric module
`tasks/metrics/retrieval` (`retrieval_metrics_from_embeddings` / `RetrievalRankAccumulator`).

Tie rule (the only one): **ties count against the ground truth.** The rank of the ground truth is the number of
candidates scoring greater than *or equal to* it, itself included, so a constant scorer gets the worst rank (`N`),
never the best; video-to-text ranks a video at its best-ranked ground-truth caption, and its other captions are never
counted as errors. See [`TIE_RULE`].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .base import DownstreamTask

TIE_RULE = "ties count against the ground truth: rank = number of candidates scoring >= the ground truth"


def retrieval_scores(
    text_embeds: Any,
    video_embeds: Any,
    text_to_video: Sequence[int] | None = None,
    *,
    dual_softmax: bool = False,
    dual_softmax_temperature: float = 100.0,
    normalize: bool = True,
) -> dict[str, float]:
    """
    Retrieval metrics (`{t2v,v2t}_{r1,r5,r10,medr,meanr}` in percent / ranks, `num_texts`, `num_videos`, plus the
    `dsl_` copies with `dual_softmax`) of text and video embeddings under [`TIE_RULE`], chunked (the full similarity
    matrix is never stored). `text_to_video=None` means text `i` belongs to video `i`.
    """
    from .metrics import retrieval_metrics_from_embeddings

    def _array(x: Any):
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x

    return retrieval_metrics_from_embeddings(
        _array(text_embeds),
        _array(video_embeds),
        text_to_video,
        normalize=normalize,
        dual_softmax=dual_softmax,
        dual_softmax_temperature=dual_softmax_temperature,
    )


def chance_retrieval_metrics(num_videos: int, captions_per_video: int = 1) -> dict[str, float]:
    """Expected metrics of a random ranking of `num_videos` videos with `captions_per_video` captions each.

    Text-to-video: R@K = K / N, mean and median rank (N + 1) / 2. Video-to-text (a video counts at its best caption
    among `n = N * m` texts): R@K = 1 - C(n - m, K) / C(n, K), mean rank 1 + (n - m) / (m + 1).
    """
    if num_videos < 1 or captions_per_video < 1:
        raise ValueError("chance_retrieval_metrics needs at least one video and one caption per video")
    m = captions_per_video
    n = num_videos * m
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        out[f"t2v_r{k}"] = 100.0 * min(k, num_videos) / num_videos
    out["t2v_medr"] = (num_videos + 1) / 2.0
    out["t2v_meanr"] = (num_videos + 1) / 2.0
    for k in (1, 5, 10):
        fail = 1.0
        for j in range(min(k, n)):
            fail *= max(0.0, (n - m - j) / (n - j))
        out[f"v2t_r{k}"] = 100.0 * (1.0 - fail)
    out["v2t_meanr"] = 1.0 + (n - m) / (m + 1.0)
    return out


def _pooled(output: Any) -> torch.Tensor:
    # `get_*_features` returns an output with `pooler_output` (ClusterSTM, newer CLIP) or a tensor (older CLIP).
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def encode_retrieval_batches(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Text and video embeddings (float32, L2-normalised, on CPU) of `batches` (dicts with `pixel_values`, `input_ids`,
    `attention_mask`; a batch may miss the video or the text side) through `model.get_video_features` /
    `get_text_features` (`model` or its `.clusterstm` dual encoder), in eval mode (the mode is restored).
    """
    encoder = getattr(model, "clusterstm", model)
    was_training = model.training
    model.eval()
    device = next(encoder.parameters()).device
    videos, texts = [], []
    try:
        for batch in batches:
            if "pixel_values" in batch:
                videos.append(_pooled(encoder.get_video_features(pixel_values=batch["pixel_values"].to(device))))
            if "input_ids" in batch:
                texts.append(
                    _pooled(
                        encoder.get_text_features(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device),
                        )
                    )
                )
    finally:
        model.train(was_training)

    def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu()

    return _cat(texts), _cat(videos)


def zero_shot_retrieval(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], text_to_video: Sequence[int] | None = None
) -> dict[str, float]:
    """[`retrieval_scores`] of the embeddings [`encode_retrieval_batches`] computes, plus `chance_r1` (percent)."""
    text_embeds, video_embeds = encode_retrieval_batches(model, batches)
    metrics = {k: float(v) for k, v in retrieval_scores(text_embeds, video_embeds, text_to_video).items()}
    metrics["chance_r1"] = 100.0 / video_embeds.shape[0]
    return metrics


def evaluate_zero_shot_retrieval(
    model: torch.nn.Module,
    processor: Any,
    dataset: Any,
    batch_size: int = 32,
    caption_column: str = "caption",
    max_text_length: int = 32,
) -> dict[str, float]:
    """
    Zero-shot text-to-video and video-to-text retrieval of a (pre)trained ClusterSTM model on `dataset` (one
    caption per clip; e.g. the synthetic `test` split), with unmasked videos and uniformly sampled frames, batched by
    the package's one collator (`clusterstm.data.readers.VideoTextCollator`).

    Args:
        model: `ClusterSTMForPreTraining`, `ClusterSTMModel` or any model with a `.clusterstm` dual encoder.
        processor: its `ClusterSTMProcessor`.
        dataset: map-style dataset with a `video` array or `video_path` column and `caption_column`.

    Returns:
        `dict` with `t2v_r1`, `t2v_r5`, `t2v_r10`, `v2t_r1`, ... in percent and `chance_r1`.
    """
    from ..data.readers import VideoTextCollator

    collator = VideoTextCollator(
        processor, sampling="uniform", max_length=max_text_length, caption_column=caption_column
    )
    batches = (
        collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    )
    return zero_shot_retrieval(model, batches)


def chance_baseline(train_data: Any, eval_data: Any, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """Chance retrieval on the evaluation records (keys `baseline_chance_*`), see [`chance_retrieval_metrics`]."""
    num_texts = sum(len(c) for c in eval_data.captions)
    out = chance_retrieval_metrics(len(eval_data), max(1, round(num_texts / max(len(eval_data), 1))))
    return {f"baseline_chance_{k}": v for k, v in out.items()}


TASK = DownstreamTask(
    name="retrieval",
    head_class_name="ClusterSTMForVideoTextRetrieval",
    records="captions",
    training_targets="contrastive",
    evaluation="retrieval",
    pipeline_tag="feature-extraction",
    card_metrics={
        "r1": ("recall@1", "R@1"),
        "r5": ("recall@5", "R@5"),
        "r10": ("recall@10", "R@10"),
        "medr": ("median_rank", "MedR"),
        "meanr": ("mean_rank", "MeanR"),
    },
    card_tasks={
        "t2v": ("text-to-video-retrieval", "Text-to-Video Retrieval"),
        "v2t": ("video-to-text-retrieval", "Video-to-Text Retrieval"),
    },
    aliases=("retrieval",),
    baseline=chance_baseline,
    headline=("t2v_r1", "text->video R@1 (%)", "baseline_chance_t2v_r1", "chance"),
)
