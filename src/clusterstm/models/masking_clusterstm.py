# Copyright 2026 The ClusterSTM Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Token masking strategies for video pretraining.

This module implements cluster-wise spatio-temporal masking (ClusterSTM, Algorithms I and II of the paper's
supplementary material) together with the usual baselines (random, tube and attention-guided masking).

Conventions shared by every function here:

* Masks follow VideoMAE: ``True`` means *masked* (dropped), ``False`` means *kept*.
* Every frame keeps exactly ``K = N - int(N * mask_ratio)`` tokens, whatever the input (ties, duplicated tokens and
  static videos included), so masked batches can always be packed into a dense tensor.
* Inputs of any floating dtype are accepted; the arithmetic runs in float32 (float64 inputs stay float64), also under
  `torch.autocast` (switched off locally), and every output lives on the input's device.
* Masks and densities are not differentiable: everything runs under `torch.no_grad()`.
* Nothing loops in Python over batch, frames or tokens; the only loops walk over memory chunks so that the largest
  intermediate stays bounded (``max_chunk_elements``).

The file is Hub remote code: it only imports torch and never the ``clusterstm`` package itself.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

# Upper bound, in elements, of the largest intermediate tensor built per chunk (2**25 float32 = 128 MiB).
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25
# Lower bound of the temporal cut-off distance, as in the design notes.
MIN_CUTOFF_DISTANCE = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------------


def num_visible_tokens(num_tokens: int, mask_ratio: float) -> int:
    """
    Number of tokens each frame keeps: `K = num_tokens - int(num_tokens * mask_ratio)`.

    Args:
        num_tokens (`int`): tokens per frame `N` (>= 1).
        mask_ratio (`float`): fraction of tokens to mask, in `[0, 1)`.

    Returns:
        `int`: `K`, with `1 <= K <= N`.
    """
    _check_positive_int(num_tokens, "num_tokens")
    _check_mask_ratio(mask_ratio)
    return int(num_tokens) - int(int(num_tokens) * float(mask_ratio))


def _check_mask_ratio(mask_ratio: float) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise ValueError(f"`mask_ratio` must be a float in [0, 1), got {mask_ratio!r}.")
    if not math.isfinite(mask_ratio) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"`mask_ratio` must be in [0, 1), got {mask_ratio!r}.")


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_tokens(x: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must have rank {ndim} {layout}, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating point tensor, got dtype {x.dtype}.")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf).")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; every other floating dtype (fp16, bf16, fp32, ...) is computed in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_disabled(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on `x`'s device: under bf16/fp16 autocast, `bmm` / `baddbmm` would run in
    low precision again after the float32 up-cast, and near-ties of densities and distances would flip masks."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.to(_compute_dtype(x.dtype)), p=2.0, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Step 1: DPC-KNN clustering inside every frame
# ---------------------------------------------------------------------------------------------------------------------


def _pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances `(B', N, N)` from one Gram matrix (its diagonal gives the squared norms, so two
    bit-identical tokens are exactly at distance zero)."""
    gram = torch.bmm(x, x.transpose(1, 2))
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    sq_dist = (sq_norms[:, :, None] + sq_norms[:, None, :]).sub_(gram, alpha=2.0).clamp_min_(0.0)
    sq_dist.diagonal(dim1=1, dim2=2).zero_()
    return sq_dist


def _dpc_knn_chunk(x: torch.Tensor, num_clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN on already normalised tokens `(b, N, C)`; returns labels, centres and the local density rho."""
    b, n, c = x.shape
    # d_ij^2 = ||x_i - x_j||^2 / C
    sq_dist = _pairwise_sq_dist(x).div_(c)
    # local density: exp(-mean of the k smallest squared distances); the row's own zero is among them
    knn_sq = torch.topk(sq_dist, k, dim=-1, largest=False).values
    rho = torch.exp(-knn_sq.mean(dim=-1))
    dist = sq_dist.sqrt_()

    # j is "denser" than i when rho_j > rho_i, or rho_j == rho_i and j < i (index tie-break, no noise)
    index = torch.arange(n, device=x.device)
    denser = (rho[:, None, :] > rho[:, :, None]) | (
        (rho[:, None, :] == rho[:, :, None]) & (index[None, :] < index[:, None])
    )
    dist_max = dist.flatten(1).amax(dim=1)[:, None, None]
    # min over denser tokens; the densest token has none and gets the frame's largest distance
    delta = torch.where(denser, dist, dist_max).amin(dim=-1)
    del denser

    score = rho * delta
    # stable descending sort: equal scores keep index order, so the lower index becomes the centre
    centers = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :num_clusters]

    # nearest centre; argmin returns the first minimum, i.e. the centre found first
    dist_to_centers = torch.gather(dist, 2, centers[:, None, :].expand(b, n, num_clusters))
    labels = dist_to_centers.argmin(dim=-1)
    # a centre always forms its own cluster, even if it coincides with an earlier centre
    cluster_ids = torch.arange(num_clusters, device=x.device).expand(b, num_clusters)
    labels.scatter_(1, centers, cluster_ids)
    return labels, centers, rho


def _dpc_knn(
    x: torch.Tensor, num_clusters: int, k: int, max_chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bp, n, _ = x.shape
    k = min(k, n)
    rows_per_chunk = max(1, max_chunk_elements // (n * n))
    labels = torch.empty(bp, n, dtype=torch.long, device=x.device)
    centers = torch.empty(bp, num_clusters, dtype=torch.long, device=x.device)
    rho = torch.empty(bp, n, dtype=x.dtype, device=x.device)
    for start in range(0, bp, rows_per_chunk):
        end = min(start + rows_per_chunk, bp)
        labels[start:end], centers[start:end], rho[start:end] = _dpc_knn_chunk(x[start:end], num_clusters, k)
    return labels, centers, rho


@torch.no_grad()
def dpc_knn(
    x: torch.Tensor,
    num_clusters: int,
    k: int = 5,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    Density peak clustering with k-nearest-neighbour density (DPC-KNN), independently for every row of `x`.

    Tokens are L2-normalised first. With `d_ij = ||x_i - x_j|| / sqrt(C)`:

    1. local density `rho_i = exp(-mean of d_ij^2 over the k smallest d_ij of row i)` (its own zero included);
    2. `delta_i = min d_ij` over tokens `j` denser than `i` (`rho_j > rho_i`, or equal density and `j < i`); the
       densest token gets the largest distance of the row;
    3. the `num_clusters` tokens with the highest `rho * delta` are the centres (ties: lower index first);
    4. every token joins its nearest centre (ties: the centre found first); every centre is in its own cluster.

    Args:
        x (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`): token features, any floating dtype.
        num_clusters (`int`): number of clusters `K`, `1 <= K <= num_tokens`.
        k (`int`, *optional*, defaults to 5): neighbours used for the local density (clamped to `num_tokens`).
        max_chunk_elements (`int`, *optional*): bound on the size of the `(rows, N, N)` intermediates.

    Returns:
        `tuple(torch.LongTensor, torch.LongTensor)`: `labels` of shape `(batch_size, num_tokens)` with values in
        `[0, K)` (label `c` is the cluster of `centers[:, c]`), and `centers` of shape `(batch_size, K)`: token
        indices of the centres in decreasing score order.
    """
    _check_tokens(x, "x", 3, "(batch_size, num_tokens, hidden_size)")
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    n = x.shape[1]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, numbers.Integral) or not 1 <= num_clusters <= n:
        raise ValueError(f"`num_clusters` must be an integer in [1, num_tokens={n}], got {num_clusters!r}.")
    with _autocast_disabled(x):
        labels, centers, _ = _dpc_knn(_normalize(x), int(num_clusters), int(k), int(max_chunk_elements))
    return labels, centers


# ---------------------------------------------------------------------------------------------------------------------
# Step 2: temporal density (Algorithm II)
# ---------------------------------------------------------------------------------------------------------------------


def _quantile_positions(num_values: int, q: float, dtype: torch.dtype) -> tuple[int, int, torch.Tensor]:
    """Indices and weight of `torch.quantile(..., interpolation="linear")` for `num_values` sorted values,
    computed with the same arithmetic as torch (rank = q * (n - 1) in the input dtype)."""
    rank = torch.tensor(q, dtype=dtype) * (num_values - 1)
    below = int(rank.to(torch.long))
    above = int(torch.ceil(rank).to(torch.long))
    weight = rank - below
    return below, above, weight


def _kth_smallest_pair(values: torch.Tensor, below: int, above: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `below`-th and `above`-th (0-based) smallest values along the last dim, exactly, without sorting
    everything."""
    n = values.shape[-1]
    if above + 1 <= max(1, n // 8):
        # a partial selection of the smallest values is cheaper than two full selections for small quantiles
        smallest = torch.topk(values, above + 1, dim=-1, largest=False, sorted=True).values
        return smallest[..., below], smallest[..., above]
    value_below = torch.kthvalue(values, below + 1, dim=-1).values
    value_above = value_below if above == below else torch.kthvalue(values, above + 1, dim=-1).values
    return value_below, value_above


def _temporal_density(x: torch.Tensor, dc_ratio: float, max_chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal density `(B, T, N)` and cut-off distance `(B, T)` of normalised tokens `x` with `T >= 2`."""
    b, t, n, c = x.shape
    below, above, weight = _quantile_positions((t - 1) * n * n, dc_ratio, x.dtype)
    weight = weight.to(x.device)

    # one video at a time keeps every (frame, token) x (other frame, token) distance of that video together
    videos_per_chunk = max(1, max_chunk_elements // ((t * n) ** 2))
    flat = x.reshape(b, t * n, c)
    rho = torch.empty(b, t, n, dtype=x.dtype, device=x.device)
    cutoff = torch.empty(b, t, dtype=x.dtype, device=x.device)
    for start in range(0, b, videos_per_chunk):
        end = min(start + videos_per_chunk, b)
        chunk = flat[start:end]
        # dist[v, s, i, u, j] = 1 - <x_si, x_uj>
        dist = torch.baddbmm(
            torch.ones((), dtype=x.dtype, device=x.device), chunk, chunk.transpose(1, 2), beta=1.0, alpha=-1.0
        ).view(end - start, t, n, t, n)
        # the frame's own tokens are excluded: +inf is never among the smallest values and exp(-inf) adds 0
        dist.diagonal(dim1=1, dim2=3).fill_(float("inf"))

        value_below, value_above = _kth_smallest_pair(dist.view(end - start, t, -1), below, above)
        dc = torch.lerp(value_below, value_above, weight).clamp_min_(MIN_CUTOFF_DISTANCE)
        cutoff[start:end] = dc

        dist.div_(dc[:, :, None, None, None]).square_().neg_().exp_()
        rho[start:end] = dist.view(end - start, t, n, t * n).sum(dim=-1).div_(n)
        del dist
    return rho, cutoff


@torch.no_grad()
def temporal_density(
    x: torch.Tensor,
    dc_ratio: float = 0.02,
    k: int = 5,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """
    Temporal density of every token (Algorithm II): how well a token is supported by the tokens of the other frames.

    For token `i` of frame `t` and all tokens `j` of every other frame `u != t`, `dist = 1 - <x_ti, x_uj>` on
    L2-normalised tokens. The cut-off `dc_t` is the `dc_ratio` quantile (linear interpolation, exactly as
    `torch.quantile`) of the `N * (T - 1) * N` distances of frame `t`, clamped to `>= 1e-6`, and
    `rho_ti = sum_j exp(-(dist / dc_t)^2) / N`. `torch.quantile` itself is not used: it refuses inputs above 2**24
    elements; a partial selection per chunk gives the same value.

    With a single frame (`T = 1`, an image) there are no other frames; the DPC-KNN local density (with `k`
    neighbours) is returned instead.

    Args:
        x (`torch.Tensor` of shape `(batch_size, num_frames, num_tokens, hidden_size)`): token features.
        dc_ratio (`float`, *optional*, defaults to 0.02): quantile of the distances used as cut-off, in `[0, 1]`.
        k (`int`, *optional*, defaults to 5): neighbours of the single-frame fallback density.
        max_chunk_elements (`int`, *optional*): bound on the per-chunk distance tensor (at least one video).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_frames, num_tokens)`: float32 (float64 for float64 inputs), on the
        input's device.
    """
    _check_tokens(x, "x", 4, "(batch_size, num_frames, num_tokens, hidden_size)")
    _check_dc_ratio(dc_ratio)
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    dc_ratio, k, max_chunk_elements = float(dc_ratio), int(k), int(max_chunk_elements)
    with _autocast_disabled(x):
        x = _normalize(x)
        b, t, n, c = x.shape
        if t == 1:
            _, _, rho = _dpc_knn(x.reshape(b, n, c), 1, k, max_chunk_elements)
            return rho.reshape(b, 1, n)
        return _temporal_density(x, dc_ratio, max_chunk_elements)[0]


def _check_dc_ratio(dc_ratio: float) -> None:
    if isinstance(dc_ratio, bool) or not isinstance(dc_ratio, numbers.Real) or not 0.0 <= dc_ratio <= 1.0:
        raise ValueError(f"`dc_ratio` must be a float in [0, 1], got {dc_ratio!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Step 3: cluster-wise masking (Algorithm I)
# ---------------------------------------------------------------------------------------------------------------------


def _keep_best_per_cluster(labels: torch.Tensor, scores: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Boolean mask `(B', N)` that keeps, in each cluster, the token of highest score (ties: lowest index)."""
    bp, n = labels.shape
    best = torch.full((bp, num_clusters), -torch.inf, dtype=scores.dtype, device=scores.device)
    best.scatter_reduce_(1, labels, scores, reduce="amax", include_self=True)
    index = torch.arange(n, device=labels.device).expand(bp, n)
    candidates = torch.where(scores == best.gather(1, labels), index, n)
    keep = torch.full((bp, num_clusters), n, dtype=torch.long, device=labels.device)
    keep.scatter_reduce_(1, labels, candidates, reduce="amin", include_self=True)
    mask = torch.ones(bp, n, dtype=torch.bool, device=labels.device)
    mask.scatter_(1, keep, False)
    return mask


@torch.no_grad()
def cluster_wise_mask(
    x: torch.Tensor,
    mask_ratio: float,
    dc_ratio: float = 0.02,
    k: int = 5,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.BoolTensor:
    """
    Cluster-wise spatio-temporal masking (ClusterSTM, Algorithm I).

    Each frame's tokens are split into `K = N - int(N * mask_ratio)` clusters by [`dpc_knn`]; in every cluster the
    token with the highest [`temporal_density`] is kept (ties: lowest index) and the others are masked. Every frame
    therefore keeps exactly `K` tokens. (The pseudocode's division by the cluster sum does not change the argmax and
    is skipped.)

    Args:
        x (`torch.Tensor` of shape `(batch_size, num_frames, num_tokens, hidden_size)`): token features (e.g. teacher
            patch tokens or pixel patches), any floating dtype; L2-normalised internally.
        mask_ratio (`float`): fraction of tokens to mask, in `[0, 1)`.
        dc_ratio (`float`, *optional*, defaults to 0.02): quantile used for the temporal cut-off distance.
        k (`int`, *optional*, defaults to 5): neighbours of the DPC-KNN local density.
        max_chunk_elements (`int`, *optional*): bound on the largest intermediate tensor of a chunk.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_frames, num_tokens)`, `True` = masked, on the input's device.
    """
    _check_tokens(x, "x", 4, "(batch_size, num_frames, num_tokens, hidden_size)")
    _check_dc_ratio(dc_ratio)
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    dc_ratio, k, max_chunk_elements = float(dc_ratio), int(k), int(max_chunk_elements)
    b, t, n, c = x.shape
    num_keep = num_visible_tokens(n, mask_ratio)
    with _autocast_disabled(x):
        x = _normalize(x)
        labels, _, local_rho = _dpc_knn(x.reshape(b * t, n, c), num_keep, k, max_chunk_elements)
        if t == 1:
            rho = local_rho
        else:
            rho = _temporal_density(x, dc_ratio, max_chunk_elements)[0].reshape(b * t, n)
        return _keep_best_per_cluster(labels, rho, num_keep).reshape(b, t, n)


# ---------------------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------------------


def _mask_from_keys(keys: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Keep the `num_keep` largest keys along the last dim (ties: lower index), mask the rest."""
    keep = torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :num_keep]
    mask = torch.ones(keys.shape, dtype=torch.bool, device=keys.device)
    return mask.scatter_(-1, keep, False)


def _check_sizes(batch_size: int, num_frames: int, num_tokens: int) -> None:
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(num_frames, "num_frames")
    _check_positive_int(num_tokens, "num_tokens")


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None
) -> torch.Tensor:
    # draw on the generator's device so that a given generator state always yields the same mask
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device)


def random_mask(
    batch_size: int,
    num_frames: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.BoolTensor:
    """
    Random masking: every frame independently keeps `K = N - int(N * mask_ratio)` uniformly chosen tokens.

    Args:
        batch_size (`int`), num_frames (`int`), num_tokens (`int`): mask shape `(B, T, N)`.
        mask_ratio (`float`): fraction of tokens to mask, in `[0, 1)`.
        generator (`torch.Generator`, *optional*): source of randomness, for reproducible masks.
        device (`torch.device` or `str`, *optional*): device of the returned mask (default: the generator's, else CPU).

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_frames, num_tokens)`, `True` = masked.
    """
    _check_sizes(batch_size, num_frames, num_tokens)
    num_keep = num_visible_tokens(num_tokens, mask_ratio)
    noise = _uniform((batch_size, num_frames, num_tokens), generator, device)
    mask = _mask_from_keys(noise, num_keep)
    return mask.to(device) if device is not None else mask


def tube_mask(
    batch_size: int,
    num_frames: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.BoolTensor:
    """
    Tube masking (VideoMAE): one random spatial mask per video, repeated over all its frames.

    Arguments are those of [`random_mask`].

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_frames, num_tokens)`, `True` = masked.
    """
    _check_sizes(batch_size, num_frames, num_tokens)
    num_keep = num_visible_tokens(num_tokens, mask_ratio)
    noise = _uniform((batch_size, 1, num_tokens), generator, device)
    mask = _mask_from_keys(noise, num_keep).expand(batch_size, num_frames, num_tokens).contiguous()
    return mask.to(device) if device is not None else mask


@torch.no_grad()
def attention_guided_mask(
    cls_attention: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """
    Attention-guided masking (Unmasked Teacher style): every frame keeps `K = N - int(N * mask_ratio)` tokens sampled
    without replacement with probability proportional to the teacher's CLS attention.

    Sampling uses the Gumbel-top-k trick (`log p + Gumbel noise`, keep the `K` largest keys), which draws exactly
    from the distribution of sequential sampling without replacement, in one vectorised pass. Tokens of zero attention
    are only kept when a frame has fewer than `K` tokens of positive attention (then in index order); a frame whose
    attention is all zero is sampled uniformly.

    Args:
        cls_attention (`torch.Tensor` of shape `(batch_size, num_frames, num_tokens)`): non-negative attention
            weights (need not sum to one), any floating dtype.
        mask_ratio (`float`): fraction of tokens to mask, in `[0, 1)`.
        generator (`torch.Generator`, *optional*): source of randomness, for reproducible masks.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_frames, num_tokens)`, `True` = masked, on the input's device.
    """
    _check_tokens(cls_attention, "cls_attention", 3, "(batch_size, num_frames, num_tokens)")
    if bool((cls_attention < 0).any()):
        raise ValueError("`cls_attention` must be non-negative.")
    num_keep = num_visible_tokens(cls_attention.shape[-1], mask_ratio)

    with _autocast_disabled(cls_attention):
        weights = cls_attention.to(_compute_dtype(cls_attention.dtype))
        # all-zero frames fall back to uniform sampling
        weights = torch.where(weights.sum(dim=-1, keepdim=True) > 0, weights, torch.ones_like(weights))
        log_probs = torch.log(weights / weights.sum(dim=-1, keepdim=True))

        uniform = _uniform(tuple(weights.shape), generator, weights.device).to(
            device=weights.device, dtype=weights.dtype
        )
        tiny = torch.finfo(weights.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - torch.finfo(weights.dtype).eps)))
        return _mask_from_keys(log_probs + gumbel, num_keep)


# ---------------------------------------------------------------------------------------------------------------------
# One door for masks: a strategy table and the builder every caller goes through
# ---------------------------------------------------------------------------------------------------------------------

from collections.abc import Callable, Sequence  # noqa: E402  (kept with the section it serves)


def _per_sample(draw, batch_size: int, generator) -> torch.BoolTensor:
    """`draw(index_slice, generator)` for the whole batch with one generator, or per sample with a list of them (so a
    sample's mask does not depend on how the batch is split over processes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(slice(0, batch_size), generator)
    if len(generator) != batch_size:
        raise ValueError(f"`generator` is a list of {len(generator)} generators for a batch of {batch_size} videos.")
    return torch.cat([draw(slice(i, i + 1), g) for i, g in enumerate(generator)], dim=0)


def _cluster_strategy(*, features, mask_ratio, dc_ratio, dpc_k, **_) -> torch.BoolTensor:
    return cluster_wise_mask(features, mask_ratio, dc_ratio=dc_ratio, k=dpc_k)


def _random_strategy(*, batch_size, num_frames, num_patches, mask_ratio, generator, device, **_) -> torch.BoolTensor:
    return _per_sample(
        lambda rows, g: random_mask(rows.stop - rows.start, num_frames, num_patches, mask_ratio, g, device),
        batch_size,
        generator,
    )


def _tube_strategy(*, batch_size, num_frames, num_patches, mask_ratio, generator, device, **_) -> torch.BoolTensor:
    return _per_sample(
        lambda rows, g: tube_mask(rows.stop - rows.start, num_frames, num_patches, mask_ratio, g, device),
        batch_size,
        generator,
    )


def _attention_strategy(*, batch_size, cls_attention, mask_ratio, generator, device, **_) -> torch.BoolTensor:
    mask = _per_sample(lambda rows, g: attention_guided_mask(cls_attention[rows], mask_ratio, g), batch_size, generator)
    return mask.to(device) if device is not None else mask


def _none_strategy(**_) -> None:
    return None


# Adding a strategy is one entry here (plus `STRATEGY_INPUTS` when it needs teacher-side inputs).
MASK_STRATEGIES: dict[str, Callable[..., torch.BoolTensor | None]] = {
    "cluster": _cluster_strategy,
    "random": _random_strategy,
    "tube": _tube_strategy,
    "attention": _attention_strategy,
    "none": _none_strategy,
}
# Inputs a strategy cannot do without, beyond the token grid: validated once, in `build_mask`.
STRATEGY_INPUTS: dict[str, tuple[str, ...]] = {"cluster": ("features",), "attention": ("cls_attention",)}


def build_mask(
    strategy: str,
    *,
    batch_size: int,
    num_frames: int,
    num_patches: int,
    mask_ratio: float,
    features: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dc_ratio: float = 0.02,
    dpc_k: int = 5,
) -> torch.BoolTensor | None:
    """
    The video token mask `(batch_size, num_frames, num_patches)` (`True` = dropped, VideoMAE convention) of one
    masking strategy, or `None` for `"none"`. This is the only entry point that turns a strategy name into a mask; the
    vision tower only takes the result as `bool_masked_pos`.

    Args:
        strategy (`str`): a key of `MASK_STRATEGIES`: `"cluster"`, `"random"`, `"tube"`, `"attention"` or `"none"`.
        batch_size, num_frames, num_patches (`int`): the token grid (frames after tubelets, patches per frame).
        mask_ratio (`float`): fraction of the tokens of every frame that is dropped, in `[0, 1)`.
        features (`torch.Tensor` of shape `(batch_size, num_frames, num_patches, dim)`, *optional*): token features
            that drive `"cluster"` (the teacher's patch tokens, or the student's detached patch embeddings).
        cls_attention (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`, *optional*): the teacher's
            CLS attention, needed by `"attention"`.
        generator (`torch.Generator` or a list of `batch_size` generators, *optional*): randomness of `"random"`,
            `"tube"` and `"attention"`; with a list, sample `i` is drawn from `generator[i]` only.
        device (*optional*): device of the returned mask (default: the inputs').
        dc_ratio (`float`), dpc_k (`int`): temporal density cut-off and DPC-KNN neighbours of `"cluster"`.
    """
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"Unknown mask strategy {strategy!r}; expected one of {sorted(MASK_STRATEGIES)}.")
    _check_sizes(batch_size, num_frames, num_patches)
    _check_mask_ratio(mask_ratio)
    grid = (batch_size, num_frames, num_patches)
    given = {"features": features, "cls_attention": cls_attention}
    for name in STRATEGY_INPUTS.get(strategy, ()):
        if given[name] is None:
            layout = f"{grid} + (dim,)" if name == "features" else str(grid)
            raise ValueError(f"mask strategy {strategy!r} needs `{name}` of shape {layout}.")
    if features is not None and strategy == "cluster" and (features.ndim != 4 or tuple(features.shape[:3]) != grid):
        raise ValueError(
            f"mask strategy 'cluster': `features` has shape {tuple(features.shape)}, expected {grid} + (dim,) "
            "(batch_size, frames, patches, dim); the teacher and the student must share frames and patch grid."
        )
    if cls_attention is not None and strategy == "attention" and tuple(cls_attention.shape) != grid:
        raise ValueError(
            f"mask strategy 'attention': `cls_attention` has shape {tuple(cls_attention.shape)}, expected {grid} "
            "(batch_size, frames, patches)."
        )
    mask = MASK_STRATEGIES[strategy](
        batch_size=batch_size,
        num_frames=num_frames,
        num_patches=num_patches,
        mask_ratio=mask_ratio,
        features=features,
        cls_attention=cls_attention,
        generator=generator,
        device=device,
        dc_ratio=dc_ratio,
        dpc_k=dpc_k,
    )
    if mask is not None and device is not None:
        mask = mask.to(device)
    return mask
