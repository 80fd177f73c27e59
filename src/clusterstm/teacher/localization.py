"""How well a relevance map points at the objects a caption names (`relevance_localization`).

Two standard scores, computed frame by frame against ground-truth object masks on the token grid (e.g.
`clusterstm.data.synthetic.object_token_masks`):

* pointing game: the fraction of frames whose highest-relevance token lies on a named object;
* AUC: the probability that a random named-object token has higher relevance than a random other token of the same
  frame (ties count one half), i.e. the ROC AUC of relevance as a detector of named-object tokens, averaged over
  frames.

Frames with no object token, or with only object tokens, have neither score and are skipped (their count is returned).
"""

from __future__ import annotations

import torch


def _rank_auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-row ROC AUC (Mann-Whitney U with mid-ranks for ties); `scores` `(F, N)` float64, `positive` `(F, N)` bool."""
    order = scores.argsort(dim=1)
    sorted_scores = scores.gather(1, order)
    n = scores.shape[1]
    ranks = torch.empty_like(scores)
    # Mid-ranks for ties: the mean position of each run of equal values.
    mid = torch.empty_like(scores)
    for row in range(scores.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_scores[row], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).to(scores.dtype)
        starts = ends - counts.to(scores.dtype) + 1
        mid[row] = ((starts + ends) / 2)[inverse]
    ranks.scatter_(1, order, mid)
    num_pos = positive.sum(1).to(scores.dtype)
    num_neg = n - num_pos
    rank_sum = (ranks * positive).sum(1)
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def relevance_localization(relevance: torch.Tensor, object_token_masks: torch.Tensor) -> dict[str, float]:
    """
    Localisation quality of relevance maps.

    Args:
        relevance (`torch.Tensor` of shape `(batch_size, num_frames, num_tokens)`): relevance of every token.
        object_token_masks (`torch.Tensor` or array of shape `(batch_size, num_frames, num_tokens)`, bool): `True`
            on tokens covered by an object the caption names.

    Returns:
        `{"pointing_game": float, "auc": float, "num_frames": int, "num_skipped_frames": int}`; the scores are
        fractions in [0, 1] (NaN when every frame is skipped), averaged over the scored frames.
    """
    masks = torch.as_tensor(object_token_masks)
    if not isinstance(relevance, torch.Tensor) or relevance.dim() != 3:
        raise ValueError(
            f"`relevance` must be a (batch_size, num_frames, num_tokens) tensor, got "
            f"{tuple(relevance.shape) if isinstance(relevance, torch.Tensor) else type(relevance).__name__}."
        )
    if tuple(masks.shape) != tuple(relevance.shape):
        raise ValueError(
            f"`object_token_masks` has shape {tuple(masks.shape)} but `relevance` has shape {tuple(relevance.shape)}."
        )
    scores = relevance.detach().to(torch.float64).reshape(-1, relevance.shape[-1]).cpu()
    positive = masks.to(torch.bool).reshape(-1, relevance.shape[-1]).cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("`relevance` contains NaN or infinite values.")
    count = positive.sum(1)
    scored = (count > 0) & (count < positive.shape[1])
    total = scores.shape[0]
    if not scored.any():
        nan = float("nan")
        return {"pointing_game": nan, "auc": nan, "num_frames": 0, "num_skipped_frames": total}
    scores, positive = scores[scored], positive[scored]
    hits = positive.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    auc = _rank_auc(scores, positive)
    return {
        "pointing_game": float(hits.double().mean()),
        "auc": float(auc.mean()),
        "num_frames": int(scored.sum()),
        "num_skipped_frames": int(total - scored.sum()),
    }


__all__ = ["relevance_localization"]
