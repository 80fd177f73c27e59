"""Text-video retrieval metrics (Recall@K, median and mean rank in both directions).

This file is a self-contained `evaluate` metric module: `evaluate.load("<path to this folder>")` works offline.
It only depends on numpy, datasets and evaluate, so it can also be imported as a plain python module.

Conventions (those of the video-text retrieval literature, e.g. CLIP4Clip / UMT):
- `similarity[i, j]` is the score of text `i` against video `j`; `text_to_video[i]` is the ground-truth video of text
  `i`. A video may own several texts (several captions per video).
- text-to-video (t2v): every text is a query; its rank is the position of its ground-truth video.
- video-to-text (v2t): every video that owns at least one text is a query; its rank is the position of the best-ranked
  of its ground-truth texts (the other ground-truth texts of the same video are not counted as errors).
- Ranks are 1-based. Ties count *against* the ground truth (a constant scorer gets the worst rank, not the best).
- Recall@K is in percent (0-100), as in the papers' tables.
- Dual-softmax (CAMoE / DSL) is an opt-in inference re-ranking: `S * softmax(temperature * S)` where the softmax runs over
  the other modality (over texts for t2v, over videos for v2t). When enabled, its metrics are reported *in addition*
  to the plain ones, under the `dsl_` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import datasets
import evaluate
import numpy as np

_RECALL_KS = (1, 5, 10)

_DESCRIPTION = """Text-video retrieval metrics: R@1/5/10 (percent), median rank and mean rank for text-to-video and
video-to-text retrieval, with several captions per video and optional dual-softmax re-ranking."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): one similarity row per text query, `[num_texts, num_videos]`.
    references (`list[int]`): ground-truth video index of every text.
    dual_softmax (`bool`, defaults to `False`): also report dual-softmax re-ranked metrics (`dsl_` prefix).
    dual_softmax_temperature (`float`, defaults to 100.0): inverse temperature of the dual-softmax prior.
Returns:
    `t2v_r1`, `t2v_r5`, `t2v_r10` (percent), `t2v_medr`, `t2v_meanr`, the same with `v2t_`, `num_texts`, `num_videos`,
    and the `dsl_*` copies when `dual_softmax=True`.
Examples:
    >>> metric = evaluate.load("src/clusterstm/tasks/metrics/retrieval")
    >>> metric.compute(predictions=[[1.0, 0.0], [0.0, 1.0]], references=[0, 1])["t2v_r1"]
    100.0
"""

_CITATION = """@inproceedings{clusterstm2026,
  title={Cluster-Wise Spatio-Temporal Masking for Efficient Video-Language Pretraining},
  booktitle={CVPR},
  year={2026}
}"""


def _to_numpy(array, dtype=np.float64) -> np.ndarray:
    # Accept torch tensors without importing torch here.
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def _summarize(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    if ranks.size == 0:
        return {}
    out = {f"{prefix}r{k}": float(100.0 * np.mean(ranks <= k)) for k in _RECALL_KS}
    out[f"{prefix}medr"] = float(np.median(ranks))
    out[f"{prefix}meanr"] = float(np.mean(ranks))
    return out


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x_max = np.max(x, axis=axis, keepdims=True)
    return x - (x_max + np.log(np.sum(np.exp(x - x_max), axis=axis, keepdims=True)))


def dual_softmax_rerank(similarity, temperature: float = 100.0, direction: str = "t2v") -> np.ndarray:
    """Dual-softmax re-ranked scores `S * softmax(temperature * S)` over the other modality.

    Args:
        similarity: `[num_texts, num_videos]` scores.
        temperature: inverse temperature of the prior.
        direction: `"t2v"` (prior = softmax over texts, for every video) or `"v2t"` (softmax over videos, per text).

    Returns:
        Re-weighted scores with the same `[num_texts, num_videos]` layout.
    """
    sim = _to_numpy(similarity)
    if direction not in ("t2v", "v2t"):
        raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")
    axis = 0 if direction == "t2v" else 1
    return sim * np.exp(_log_softmax(temperature * sim, axis=axis))


def _check_rows(similarity_rows, gt, num_cols_name: str) -> tuple[np.ndarray, np.ndarray]:
    rows = _to_numpy(similarity_rows)
    if rows.ndim != 2:
        raise ValueError(f"similarity rows must be a 2-D [num_queries, {num_cols_name}] array, got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise ValueError("similarity rows contain NaN or infinite values")
    gt_arr = _to_numpy(gt, dtype=np.int64).reshape(-1)
    if gt_arr.shape[0] != rows.shape[0]:
        raise ValueError(f"got {rows.shape[0]} similarity rows but {gt_arr.shape[0]} ground-truth indices")
    if gt_arr.size and (gt_arr.min() < 0 or gt_arr.max() >= rows.shape[1]):
        raise ValueError(f"ground-truth index out of range [0, {rows.shape[1]}) for {num_cols_name}")
    return rows, gt_arr


def text_to_video_ranks(similarity_rows, text_to_video) -> np.ndarray:
    """1-based rank of the ground-truth video for each text row (ties count against the ground truth)."""
    rows, gt = _check_rows(similarity_rows, text_to_video, "num_videos")
    gt_scores = rows[np.arange(rows.shape[0]), gt]
    # Number of videos scoring >= the ground truth, the ground truth itself included.
    return np.sum(rows >= gt_scores[:, None], axis=1).astype(np.int64)


def video_to_text_ranks(similarity_rows, video_to_texts: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank of the best-ranked ground-truth text for each video row `[num_videos_chunk, num_texts]`.

    Other ground-truth texts of the same video never count as errors.
    """
    rows = _to_numpy(similarity_rows)
    if rows.ndim != 2:
        raise ValueError(f"similarity rows must be a 2-D [num_videos, num_texts] array, got shape {rows.shape}")
    if len(video_to_texts) != rows.shape[0]:
        raise ValueError(f"got {rows.shape[0]} video rows but {len(video_to_texts)} ground-truth text lists")
    if not np.all(np.isfinite(rows)):
        raise ValueError("similarity rows contain NaN or infinite values")
    ranks = np.empty(rows.shape[0], dtype=np.int64)
    for i, texts in enumerate(video_to_texts):
        texts = np.asarray(list(texts), dtype=np.int64)
        if texts.size == 0:
            raise ValueError(f"video row {i} has no ground-truth text")
        if texts.min() < 0 or texts.max() >= rows.shape[1]:
            raise ValueError(f"ground-truth text index out of range [0, {rows.shape[1]}) in video row {i}")
        is_gt = np.zeros(rows.shape[1], dtype=bool)
        is_gt[texts] = True
        best = rows[i, texts].max()
        ranks[i] = 1 + int(np.sum((rows[i] >= best) & ~is_gt))
    return ranks


def _invert(text_to_video: np.ndarray, num_videos: int) -> list[list[int]]:
    video_to_texts: list[list[int]] = [[] for _ in range(num_videos)]
    for text_idx, video_idx in enumerate(text_to_video.tolist()):
        video_to_texts[video_idx].append(text_idx)
    return video_to_texts


class RetrievalRankAccumulator:
    """Streaming retrieval evaluation that keeps one integer rank per query instead of the logits.

    Feed text rows `[chunk, num_videos]` with `add_batch` (text-to-video) and, optionally, video rows
    `[chunk, num_texts]` with `add_video_batch` (video-to-text). Queries can carry global indices; a query seen twice
    (e.g. the padding duplicates of a distributed sampler) is counted once. Accumulators of several processes can be
    combined with `merge`.
    """

    def __init__(self) -> None:
        self._t2v: dict[int, int] = {}
        self._v2t: dict[int, int] = {}
        self._next_text = 0
        self._next_video = 0

    @staticmethod
    def _store(store: dict[int, int], ranks: np.ndarray, indices, start: int) -> int:
        if indices is None:
            indices = range(start, start + len(ranks))
            start += len(ranks)
        else:
            indices = _to_numpy(indices, dtype=np.int64).reshape(-1).tolist()
            if len(indices) != len(ranks):
                raise ValueError(f"got {len(ranks)} rows but {len(indices)} query indices")
        for idx, rank in zip(indices, ranks.tolist()):
            store[int(idx)] = int(rank)
        return start

    def add_batch(self, similarity_rows, text_to_video, text_indices: Iterable[int] | None = None) -> None:
        """Add text-query rows `[chunk, num_videos]` and their ground-truth video indices."""
        ranks = text_to_video_ranks(similarity_rows, text_to_video)
        self._next_text = self._store(self._t2v, ranks, text_indices, self._next_text)

    def add_video_batch(
        self, similarity_rows, video_to_texts: Sequence[Sequence[int]], video_indices: Iterable[int] | None = None
    ) -> None:
        """Add video-query rows `[chunk, num_texts]` and, per row, the indices of its ground-truth texts."""
        ranks = video_to_text_ranks(similarity_rows, video_to_texts)
        self._next_video = self._store(self._v2t, ranks, video_indices, self._next_video)

    def merge(self, other: RetrievalRankAccumulator) -> RetrievalRankAccumulator:
        """Merge the ranks of another accumulator (queries identified by their indices)."""
        self._t2v.update(other._t2v)
        self._v2t.update(other._v2t)
        return self

    @property
    def t2v_ranks(self) -> np.ndarray:
        return np.asarray([self._t2v[k] for k in sorted(self._t2v)], dtype=np.int64)

    @property
    def v2t_ranks(self) -> np.ndarray:
        return np.asarray([self._v2t[k] for k in sorted(self._v2t)], dtype=np.int64)

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Recall@1/5/10 (percent), median and mean rank for every direction that received rows."""
        if not self._t2v and not self._v2t:
            raise ValueError("RetrievalRankAccumulator.compute() called before any add_batch()")
        out = _summarize(self.t2v_ranks, f"{prefix}t2v_")
        out.update(_summarize(self.v2t_ranks, f"{prefix}v2t_"))
        return out


def _check_text_to_video(similarity: np.ndarray, text_to_video) -> np.ndarray:
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be a 2-D [num_texts, num_videos] matrix, got shape {similarity.shape}")
    if text_to_video is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError("text_to_video is required when the similarity matrix is not square")
        return np.arange(similarity.shape[0], dtype=np.int64)
    gt = _to_numpy(text_to_video, dtype=np.int64).reshape(-1)
    if gt.shape[0] != similarity.shape[0]:
        raise ValueError(f"text_to_video has {gt.shape[0]} entries for {similarity.shape[0]} texts")
    _check_range(gt, similarity.shape[1])
    return gt


def _check_range(gt: np.ndarray, num_videos: int) -> None:
    if gt.size and (gt.min() < 0 or gt.max() >= num_videos):
        raise ValueError(f"text_to_video index out of range [0, {num_videos})")


def retrieval_metrics(
    similarity,
    text_to_video: Sequence[int] | None = None,
    dual_softmax: bool = False,
    dual_softmax_temperature: float = 100.0,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics of a full `[num_texts, num_videos]` similarity matrix.

    Args:
        similarity: text-by-video scores (numpy array, nested list or torch tensor).
        text_to_video: ground-truth video of every text; `None` means the identity (square matrix).
        dual_softmax: also report dual-softmax re-ranked metrics under the `dsl_` prefix.
        dual_softmax_temperature: inverse temperature of the dual-softmax prior.
        chunk_size: rows ranked at once (bounds the temporary memory).

    Returns:
        `{t2v,v2t}_{r1,r5,r10,medr,meanr}`, `num_texts`, `num_videos` (+ `dsl_*` copies).
    """
    sim = _to_numpy(similarity)
    gt = _check_text_to_video(sim, text_to_video)
    num_texts, num_videos = sim.shape
    video_to_texts = _invert(gt, num_videos)
    owned = [v for v in range(num_videos) if video_to_texts[v]]

    def _run(t2v_scores: np.ndarray, v2t_scores: np.ndarray, prefix: str) -> dict[str, float]:
        acc = RetrievalRankAccumulator()
        for start in range(0, num_texts, chunk_size):
            acc.add_batch(t2v_scores[start : start + chunk_size], gt[start : start + chunk_size])
        for start in range(0, len(owned), chunk_size):
            vids = owned[start : start + chunk_size]
            acc.add_video_batch(v2t_scores[:, vids].T, [video_to_texts[v] for v in vids], video_indices=vids)
        return acc.compute(prefix)

    out = _run(sim, sim, "")
    if dual_softmax:
        out.update(
            _run(
                dual_softmax_rerank(sim, dual_softmax_temperature, "t2v"),
                dual_softmax_rerank(sim, dual_softmax_temperature, "v2t"),
                "dsl_",
            )
        )
    out["num_texts"] = num_texts
    out["num_videos"] = num_videos
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def retrieval_metrics_from_embeddings(
    text_embeds,
    video_embeds,
    text_to_video: Sequence[int] | None = None,
    chunk_size: int = 1024,
    normalize: bool = True,
    dual_softmax: bool = False,
    dual_softmax_temperature: float = 100.0,
) -> dict[str, float]:
    """Retrieval metrics from embeddings, never materialising the full similarity matrix.

    Similarities are cosine (`normalize=True`) or dot products, computed `chunk_size` rows at a time; memory is
    `O(chunk_size * max(num_texts, num_videos))`. Dual-softmax normalisers are accumulated in a first pass.
    """
    texts = _to_numpy(text_embeds, dtype=np.float32)
    videos = _to_numpy(video_embeds, dtype=np.float32)
    if texts.ndim != 2 or videos.ndim != 2 or texts.shape[1] != videos.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with the same D, got {texts.shape} and {videos.shape}")
    if normalize:
        texts, videos = _normalize_rows(texts), _normalize_rows(videos)
    num_texts, num_videos = texts.shape[0], videos.shape[0]
    if text_to_video is None:
        if num_texts != num_videos:
            raise ValueError("text_to_video is required when the numbers of texts and videos differ")
        gt = np.arange(num_texts, dtype=np.int64)
    else:
        gt = _to_numpy(text_to_video, dtype=np.int64).reshape(-1)
        if gt.shape[0] != num_texts:
            raise ValueError(f"text_to_video has {gt.shape[0]} entries for {num_texts} texts")
        _check_range(gt, num_videos)
    video_to_texts = _invert(gt, num_videos)
    owned = [v for v in range(num_videos) if video_to_texts[v]]

    def _lse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # log-sum-exp over the rows of `a` of temperature * (a @ b.T), chunked: one value per row of `b`.
        total = np.full(b.shape[0], -np.inf)
        for start in range(0, a.shape[0], chunk_size):
            logits = dual_softmax_temperature * (a[start : start + chunk_size] @ b.T).astype(np.float64)
            total = np.logaddexp(total, np.log(np.sum(np.exp(logits - logits.max(0)), axis=0)) + logits.max(0))
        return total

    plain, dsl = RetrievalRankAccumulator(), RetrievalRankAccumulator()
    lse_over_texts = _lse(texts, videos) if dual_softmax else None  # per video
    lse_over_videos = _lse(videos, texts) if dual_softmax else None  # per text
    for start in range(0, num_texts, chunk_size):
        rows = (texts[start : start + chunk_size] @ videos.T).astype(np.float64)
        plain.add_batch(rows, gt[start : start + chunk_size])
        if dual_softmax:
            dsl.add_batch(
                rows * np.exp(dual_softmax_temperature * rows - lse_over_texts[None]), gt[start : start + chunk_size]
            )
    for start in range(0, len(owned), chunk_size):
        vids = owned[start : start + chunk_size]
        rows = (videos[vids] @ texts.T).astype(np.float64)
        gts = [video_to_texts[v] for v in vids]
        plain.add_video_batch(rows, gts, video_indices=vids)
        if dual_softmax:
            dsl.add_video_batch(rows * np.exp(dual_softmax_temperature * rows - lse_over_videos[None]), gts, vids)
    out = plain.compute()
    if dual_softmax:
        out.update(dsl.compute("dsl_"))
    out["num_texts"] = num_texts
    out["num_videos"] = num_videos
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    """`evaluate` wrapper of `retrieval_metrics` (one similarity row per text query)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2603.22953"],
        )

    def _compute(
        self, predictions, references, dual_softmax: bool = False, dual_softmax_temperature: float = 100.0
    ) -> dict[str, float]:
        lengths = {len(row) for row in predictions}
        if len(lengths) > 1:
            raise ValueError(f"all similarity rows must have the same number of videos, got lengths {sorted(lengths)}")
        return retrieval_metrics(
            np.asarray(predictions, dtype=np.float64),
            references,
            dual_softmax=dual_softmax,
            dual_softmax_temperature=dual_softmax_temperature,
        )
