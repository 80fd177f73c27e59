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
* Nothing loops in Python over tokens. Cluster-wise masking walks over memory chunks of videos, so that the largest
  intermediate stays bounded (``max_chunk_elements``; on the CPU one video at a time, which keeps its blocks in
  cache). Per chunk, the Gram matrix of each clip's `T*N` tokens is computed once, only its blocks on and above the
  diagonal: the blocks `s < u` (a few large GEMMs) serve the temporal density of both frames `s` and `u`, the
  diagonal blocks (one batched GEMM into a contiguous buffer) feed DPC-KNN. Then one quantile selection for all frames of a video on the CPU (one per frame on a GPU) and
  two exp-sums per frame pair.
* Float32 matmuls run in full precision whatever the global TF32 / bf16 matmul setting ([`exact_float32_matmul`]):
  a reduced-precision GEMM would change the masks.
* On a GPU the masking makes one host sync, the finiteness check of the inputs (on the token norms); the algorithm
  itself has no data-dependent shape and never reads a value on the host. On the CPU the quantile selection uses
  data-dependent shapes, which are faster there.

The file is Hub remote code: it only imports torch and never the ``clusterstm`` package itself.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

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


def _check_tokens(x: torch.Tensor, name: str, ndim: int, layout: str, check_finite: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must have rank {ndim} {layout}, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating point tensor, got dtype {x.dtype}.")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(x.shape)}.")
    if check_finite and not bool(torch.isfinite(x).all()):
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


def _new_api_precisions() -> list[object]:
    # the per-backend `fp32_precision` knobs of recent torch releases (absent in older ones)
    owners = [torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    return [owner for owner in owners if owner is not None and hasattr(owner, "fp32_precision")]


@contextlib.contextmanager
def exact_float32_matmul():
    """
    Context in which float32 matmuls run in full float32 precision, whatever the global setting
    (`torch.set_float32_matmul_precision("high" | "medium")`, `torch.backends.cuda.matmul.allow_tf32 = True`, or the
    per-backend `fp32_precision` of recent torch releases), restoring the previous setting on exit. TF32 / bf16 GEMMs
    round the token inner products to ~1e-3 and would change the masks. The setting is process-global: other threads
    see it for the duration of the context.
    """
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the per-backend API: torch refuses to summarise it, so that API is used here
        precision = None
    if precision is not None:
        # only the global setter: it also sets `allow_tf32` and the per-backend values consistently, whereas
        # touching those directly makes torch refuse the global getter afterwards ("mix of the legacy and new APIs")
        try:
            torch.set_float32_matmul_precision("highest")
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
        return
    saved = [(owner, owner.fp32_precision) for owner in _new_api_precisions()]
    try:
        for owner, _ in saved:
            owner.fp32_precision = "ieee"
        yield
    finally:
        for owner, value in saved:
            owner.fp32_precision = value


def _token_norms(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in the compute dtype and its token norms `(..., 1)` clamped as `F.normalize` does, checking finiteness on
    the norms: a NaN or inf anywhere in a token makes its norm non-finite, and this reads `C` times fewer values than
    `isfinite(x)`. (Finite tokens whose squared norm overflows are refused too: they cannot be normalised.) The
    check is the masking's only host sync."""
    x = x.to(_compute_dtype(x.dtype))
    norms = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf), or tokens too large to normalise.")
    return x, norms.clamp_min(1e-12)


def _normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """L2-normalised tokens in the compute dtype (the arithmetic of `F.normalize`), checked by [`_token_norms`]."""
    x, norms = _token_norms(x, name)
    return x / norms.expand_as(x)


# ---------------------------------------------------------------------------------------------------------------------
# Step 1: DPC-KNN clustering inside every frame
# ---------------------------------------------------------------------------------------------------------------------


def _smallest_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """
    The `k` smallest values of every row of `values` `(..., N)` in ascending order, i.e. `torch.topk(values, k,
    largest=False).values`, selected among few candidates: the columns are split into `g` strided groups of `N / g`
    columns each, and the `k` smallest values (as a multiset, ties included) lie in the `k` groups of smallest minimum:
    those `k` minima are `<=` the `k`-th smallest minimum, which is `<=` every value of every other group. `topk` costs
    per value, so selecting among the `N / g` minima and then the `k * g` candidates is cheaper than among all `N`.
    Fixed shapes only (no host sync).
    """
    n = values.shape[-1]
    # the group size g (a divisor of n, with at least k groups) that minimises the values topk has to look at
    g = min((g for g in range(1, n + 1) if n % g == 0 and n // g >= k), key=lambda g: n // g + k * g)
    if g == 1:
        return torch.topk(values, k, dim=-1, largest=False).values
    width = n // g
    # group j holds the columns j, j + width, ...: the minima are an elementwise min over g slices (vectorised)
    minima = values.unflatten(-1, (g, width)).amin(dim=-2)
    groups = torch.topk(minima, k, dim=-1, largest=False, sorted=False).indices
    columns = (groups[..., None] + torch.arange(0, n, width, device=values.device)).flatten(-2)
    return torch.topk(torch.gather(values, -1, columns), k, dim=-1, largest=False).values


def _dpc_from_gram(
    gram: torch.Tensor, c: int, num_clusters: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN from the Gram matrices `(b, N, N)` (any strides) of already normalised tokens of dimension `c`; returns
    labels, centres and the local density rho. Fixed shapes only (no host sync)."""
    b, n, _ = gram.shape
    k = min(k, n)
    # d_ij^2 = ||x_i - x_j||^2 / C, from the Gram matrix (its diagonal gives the squared norms, so two bit-identical
    # tokens are exactly at distance zero)
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    sq_dist = (sq_norms[:, :, None] + sq_norms[:, None, :]).sub_(gram, alpha=2.0).clamp_min_(0.0)
    sq_dist.diagonal(dim1=1, dim2=2).zero_()
    sq_dist.div_(c)
    # local density: exp(-mean of the k smallest squared distances); the row's own zero is among them
    rho = torch.exp(-_smallest_sorted(sq_dist, k).mean(dim=-1))

    # j is "denser" than i when rho_j > rho_i, or rho_j == rho_i and j < i (index tie-break, no noise): exactly when j
    # comes before i in the stable descending order of rho, i.e. rank_j < rank_i
    order = torch.sort(rho, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=gram.device).expand(b, n))
    # delta_i^2 = min over denser j of d_ij^2, as the min over j of max(d_ij^2, penalty_ij) with penalty_ij =
    # big * (rank_j - rank_i + 1/2): negative (so the max is d_ij^2, exactly) for denser j, >= big / 2 (far above any
    # squared distance, <= 4 / C) otherwise. Arithmetic instead of a boolean mask and `where`, which are much slower
    # on the CPU. big is a power of two, so the penalties are exact.
    big = 2.0**40
    scaled = rank.to(sq_dist.dtype).mul_(big)
    penalty = torch.sub(scaled[:, None, :], (scaled - big / 2)[:, :, None])
    delta_sq = torch.maximum(penalty, sq_dist, out=penalty).amin(dim=-1)
    del penalty
    # the densest token has no denser token and gets the frame's largest distance; every other delta_sq is already
    # <= it, so the minimum changes nothing else. sqrt is monotone and correctly rounded: sqrt(min) = min(sqrt).
    delta = torch.minimum(delta_sq, sq_dist.flatten(1).amax(dim=1, keepdim=True)).sqrt_()

    score = rho * delta
    # stable descending sort: equal scores keep index order, so the lower index becomes the centre
    centers = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :num_clusters]

    # nearest centre; argmin returns the first minimum, i.e. the centre found first
    dist_to_centers = torch.gather(sq_dist, 2, centers[:, None, :].expand(b, n, num_clusters)).sqrt_()
    labels = dist_to_centers.argmin(dim=-1)
    # a centre always forms its own cluster, even if it coincides with an earlier centre
    cluster_ids = torch.arange(num_clusters, device=gram.device).expand(b, num_clusters)
    labels.scatter_(1, centers, cluster_ids)
    return labels, centers, rho


def _dpc_knn_chunk(x: torch.Tensor, num_clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN on already normalised tokens `(b, N, C)`; returns labels, centres and the local density rho."""
    return _dpc_from_gram(torch.bmm(x, x.transpose(1, 2)), x.shape[2], num_clusters, k)


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
    _check_tokens(x, "x", 3, "(batch_size, num_tokens, hidden_size)", check_finite=False)
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    n = x.shape[1]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, numbers.Integral) or not 1 <= num_clusters <= n:
        raise ValueError(f"`num_clusters` must be an integer in [1, num_tokens={n}], got {num_clusters!r}.")
    with _autocast_disabled(x), exact_float32_matmul():
        labels, centers, _ = _dpc_knn(_normalize(x, "x"), int(num_clusters), int(k), int(max_chunk_elements))
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


def _upper_gram(chunk: torch.Tensor, t: int, n: int, gram: torch.Tensor, diagonal: bool = False) -> None:
    """Writes `<x_si, x_uj>` for frame pairs `s < u` only into `gram` `(v, T*N, T*N)` (strided `bmm` outputs, no
    copy); the blocks `s > u` are their transposes and are never computed nor read. With `diagonal=True` the blocks
    `s = u` (each frame's own Gram matrix) are computed too, else they are skipped (the masking computes them into a
    separate contiguous buffer instead, see [`_clip_pass`]).

    The upper triangle of blocks is tiled recursively: frames `[lo, mid)` against `[mid, hi)` in one `bmm`, then each
    half, so that most of the work runs in a few large GEMMs (faster per flop than one thin GEMM per frame)."""
    spans = [(0, t)]
    while spans:
        lo, hi = spans.pop()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        rows, columns = slice(lo * n, mid * n), slice(mid * n, hi * n)
        torch.bmm(chunk[:, rows], chunk[:, columns].transpose(1, 2), out=gram[:, rows, columns])
        spans += [(lo, mid), (mid, hi)]
    if diagonal:
        for video, blocks in zip(chunk, _diagonal_blocks(gram, t)):
            frames = video.unflatten(0, (t, n))
            torch.bmm(frames, frames.transpose(1, 2), out=blocks)


def _diagonal_blocks(gram: torch.Tensor, t: int) -> torch.Tensor:
    """The view `(v, T, N, N)` of the diagonal blocks of `gram` `(v, T*N, T*N)`: frame `s`'s own Gram matrix."""
    v, size, _ = gram.shape
    n = size // t
    return gram.view(v, t, n, t, n).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _group_size(num_values: int, n: int, count: int) -> int:
    """Rows per group for [`_largest_candidates`]: the divisor `r` of `n` that minimises the selection work, i.e. the
    `num_values / r` group maxima plus the `count * r` candidates (`r ~ sqrt(num_values / count)`)."""
    # at least `count` groups, so that `count` group maxima exist
    divisors = [r for r in range(1, n + 1) if n % r == 0 and num_values // r >= count]
    return min(divisors, key=lambda r: num_values // r + count * r)


def _largest_candidates(gram: torch.Tensor, s: int, n: int, count: int, sync_free: bool) -> torch.Tensor:
    """
    Candidates `(v, M)` that contain the `count` largest inner products of frame `s` with every other frame, per
    video, found without selecting among all of them; `gram` holds the blocks of [`_upper_gram`].

    The values are split into groups of `r` rows and each group is reduced to its maximum (one vectorised pass);
    `thr` is the `count`-th largest group maximum. At least `count` values are `>= thr` (one per group at or above it)
    and every value `> thr` lies in a group whose maximum is `> thr`, i.e. among the `count` groups of largest maximum.
    The values of those groups therefore contain the `count` largest values exactly, ties included. This is a bound,
    not an estimate: there is no sampling and no fallback.

    With `sync_free=True` every shape is fixed (`topk` of the group maxima, `M = count * r`): no host sync on a GPU.
    Otherwise (CPU, `v = 1`, data-dependent shapes) frame `s`'s row of [`_video_candidates`] (`-inf` padded), which
    selects for all frames of the video at once.
    """
    v, size, _ = gram.shape
    t = size // n
    if not sync_free:
        return _video_candidates(gram, t, n, count)[s : s + 1]
    r = _group_size((t - 1) * n * n, n, count)
    # (first row, first column, number of rows, width) of the frame's row block (frames u > s) and column block (u < s)
    regions = [(s * n, (s + 1) * n, n, (t - 1 - s) * n), (0, s * n, s * n, n)]
    regions = [region for region in regions if region[2] * region[3] > 0]
    steps = torch.arange(r, device=gram.device) * size
    blocks = [gram[:, row : row + rows, column : column + width] for row, column, rows, width in regions]
    maxima = [block.unflatten(1, (block.shape[1] // r, r)).amax(dim=2) for block in blocks]
    group = torch.topk(torch.cat([m.flatten(1) for m in maxima], dim=1), count, dim=1, sorted=False).indices
    # flat position of each chosen group's first value in `gram`, region by region
    first, offset = None, 0
    for row, column, rows, width in regions:
        local = group - offset
        position = (row + (local // width) * r) * size + column + local % width
        first = position if first is None else torch.where(local >= 0, position, first)
        offset += (rows // r) * width
    first = first + torch.arange(v, device=gram.device)[:, None] * size * size
    return gram.view(-1).index_select(0, (first[..., None] + steps).flatten()).view(v, -1)


def _estimated_rank(count: int, num_values: int, group: int, num_maxima: int) -> int:
    """A rank `<= count` among `num_maxima` maxima of groups of `group` values, drawn from the `num_values` values'
    groups, whose maximum is expected to be reached by a few more than `count` values (5 % and four standard
    deviations of a count more): if the values of a group were exchangeable, a fraction `q` of the values reaching a
    threshold would put `p = 1 - (1 - q)**group` of the group maxima above it; the rank is `p * num_maxima` plus two
    standard deviations of that count (the maxima may be a sample). Only a speed hint: [`_video_candidates`] checks
    the count it actually gets. With few values the margin exceeds what the maxima can tell, and the rank is `count`
    itself."""
    share = min(1.0, (1.05 * count + 4.0 * math.sqrt(count)) / num_values)
    p = 1.0 - (1.0 - share) ** group
    rank = p * num_maxima + 2.0 * math.sqrt(num_maxima * p * (1.0 - p))
    return max(1, min(count, num_maxima, int(rank)))


def _video_candidates(gram: torch.Tensor, t: int, n: int, count: int) -> torch.Tensor:
    """
    CPU path of [`_largest_candidates`], for one video (`gram` `(1, T*N, T*N)` holding the blocks of
    [`_upper_gram`]) and all its frames at once: `(T, M)` values, row `s` holding a superset of the `count` largest
    inner products of frame `s` with the other frames, ties included, padded with `-inf`.

    The same bound, with data-dependent shapes and few operations per video: the values of every block `s < u` are
    reduced to maxima of groups of `r` rows once, and these serve both frames (the block's values belong to frame `s`
    and to frame `u`). Only the groups whose maximum reaches a threshold `thr_s` are read, and only their values
    `>= thr_s` are kept: every value `>= thr_s` of the frame, so when there are at least `count` of them they hold
    the `count` largest values exactly, ties included. The threshold is an order statistic of the maxima of groups of
    `r2` maxima, found with `kthvalue` on `r * r2` times fewer values than the frame has: first a tight one (rank
    [`_estimated_rank`]: 24-29 % fewer values kept than with the bound, measured on Gaussian and on correlated
    tokens), then, for a video where some frame keeps fewer than `count` values, the `count`-th
    largest, which at least `count` maxima, hence values, reach (a bound: no further check needed). (The maxima of
    coarser groups would make `kthvalue` cheaper, but their estimated rank keeps far more values on correlated
    tokens.)
    """
    size = t * n
    r = _group_size((t - 1) * n * n, n, count)
    g = n // r
    # maxima[s, u]: the group maxima (g, N) of block (min(s, u), max(s, u)); -inf on the diagonal (not a frame pair)
    maxima = torch.full((t, t, g, n), -torch.inf, dtype=gram.dtype, device=gram.device)
    for s in range(t - 1):
        block = gram[0, s * n : (s + 1) * n, (s + 1) * n :]
        block_maxima = block.unflatten(0, (g, r)).amax(dim=1).unflatten(1, (t - 1 - s, n)).transpose(0, 1)
        maxima[s, s + 1 :] = block_maxima
        maxima[s + 1 :, s] = block_maxima
    # the bound: the count-th largest maximum of groups of r2 maxima (at least count of them per frame)
    r2 = next(r2 for r2 in (4, 2, 1) if g % r2 == 0 and (t - 1) * (g // r2) * n >= count)
    coarse = maxima.view(t, t, g // r2, r2, n).amax(dim=3).view(t, -1)
    # the estimate from every step-th coarse maximum (each frame pair's columns 0, step, ...), about 2048 per frame:
    # kthvalue costs per value, and a sample of that size pins the rank down well enough
    step = max(d for d in range(1, n + 1) if n % d == 0 and (d == 1 or (t - 1) * (g // r2) * (n // d) >= 2048))
    estimate = _estimated_rank(count, (t - 1) * n * n, r * r2, (t - 1) * (g // r2) * (n // step))
    selections = [(coarse, count)] if estimate >= count else [(coarse[:, ::step], estimate), (coarse, count)]
    steps = torch.arange(0, r * size, size, device=gram.device)
    for maxima_sample, rank in selections:
        # (the diagonal's -inf coarse maxima are the smallest: the rank-th largest is a real frame pair's maximum)
        threshold = torch.kthvalue(maxima_sample, maxima_sample.shape[1] - rank + 1, dim=1).values
        # the groups reaching their frame's threshold, frame by frame (row-major order), and their values
        frame, other, group, column = (maxima >= threshold[:, None, None, None]).nonzero(as_tuple=True)
        first = (torch.minimum(frame, other) * n + group * r) * size + torch.maximum(frame, other) * n + column
        values = gram.reshape(-1).index_select(0, (first[:, None] + steps).flatten())
        # frame by frame (a comparison with one scalar threshold each), the values reaching the threshold (flat:
        # boolean indexing of a 1-D tensor is ~20 % cheaper than of the (groups, r) view)
        hits = [r * groups for groups in torch.bincount(frame, minlength=t).tolist()]
        kept = [frame_values[frame_values >= thr] for frame_values, thr in zip(values.split(hits), threshold)]
        if min(len(frame_values) for frame_values in kept) >= count:
            break
    return torch.nn.utils.rnn.pad_sequence(kept, batch_first=True, padding_value=-torch.inf)


def _descending_pair(values: torch.Tensor, below: int, above: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `below`-th and `above`-th largest (0-based, `above - below` in {0, 1}) of each row of `values`, with one
    selection: the `above + 1` largest values (a multiset, ties included) hold both, as their smallest and (when
    `below = above - 1`) second smallest."""
    largest = torch.topk(values, above + 1, dim=1, sorted=False).values
    if above == below:
        largest_above = largest.amin(dim=1)
        return largest_above, largest_above
    # ascending: the above-th largest, then the below-th largest
    smallest_two = torch.topk(largest, 2, dim=1, largest=False).values
    return smallest_two[:, 1], smallest_two[:, 0]


def _video_density(
    gram: torch.Tensor,
    t: int,
    dist_buffer: torch.Tensor,
    work_buffer: torch.Tensor,
    below: int,
    above: int,
    weight: float,
    sync_free: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised temporal density `(v, T, N)` and cut-off `(v, T)` of `v` videos from the blocks `s < u` of their
    Gram matrices `gram` `(v, T*N, T*N)` ([`_upper_gram`]), using preallocated buffers (`dist_buffer` and
    `work_buffer` `(v, N, (T-1)*N)`). With `sync_free=True` no operation has a data-dependent shape or reads a value
    on the host."""
    v, size, _ = gram.shape
    n = size // t
    one = torch.ones((), dtype=gram.dtype, device=gram.device)

    # cut-off per frame: the `below`-th and `above`-th smallest distances = 1 - the largest inner products
    if sync_free:
        pairs = [_descending_pair(_largest_candidates(gram, s, n, above + 1, True), below, above) for s in range(t)]
        largest_below, largest_above = (torch.stack(values, dim=1) for values in zip(*pairs))
    else:  # the CPU path, one video: all frames in one selection
        largest_below, largest_above = (
            values[None] for values in _descending_pair(_video_candidates(gram, t, n, above + 1), below, above)
        )
    dc = torch.lerp(one - largest_below, one - largest_above, weight).clamp_min_(MIN_CUTOFF_DISTANCE)

    # rho_si = sum over other frames' tokens of exp(-(dist / dc_s)^2); block (s, u) serves frame s through its row
    # sums (cut-off dc_s) and frame u through its column sums (cut-off dc_u), each in cache-sized pieces
    # (-(w * w) in one pass: addcmul of a zero with value -1, bit-identical to square then negate)
    rho = torch.zeros(v, t, n, dtype=gram.dtype, device=gram.device)
    zero = torch.zeros((), dtype=gram.dtype, device=gram.device)
    for s in range(t - 1):
        m = t - 1 - s
        block = gram[:, s * n : (s + 1) * n, (s + 1) * n :]
        dist = torch.sub(one, block, out=dist_buffer[:, :, : m * n])
        work = torch.div(dist, dc[:, s, None, None], out=work_buffer[:, :, : m * n])
        rho[:, s] += torch.addcmul(zero, work, work, value=-1.0, out=work).exp_().sum(dim=-1)
        work = torch.div(dist.view(v, n, m, n), dc[:, None, s + 1 :, None], out=work.view(v, n, m, n))
        rho[:, s + 1 :] += torch.addcmul(zero, work, work, value=-1.0, out=work).exp_().sum(dim=1)
    return rho, dc


def _temporal_density(
    x: torch.Tensor, dc_ratio: float, max_chunk_elements: int, sync_free: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal density `(B, T, N)` and cut-off distance `(B, T)` of normalised tokens `x` with `T >= 2`.

    Only the inner products of frame pairs `s < u` are computed ([`_upper_gram`], into a buffer reused across
    chunks); each pair's block serves both frames. The distances are `fl(1 - <x_si, x_uj>)`, a non-increasing function
    of the inner product, so the quantile's order statistics are taken on the largest inner products directly.
    `sync_free` (default: on any device but the CPU) selects the quantile path without host syncs.
    """
    rho, cutoff, _ = _clip_pass(x, dc_ratio, max_chunk_elements, sync_free)
    return rho, cutoff


def _clip_pass(
    x: torch.Tensor,
    dc_ratio: float,
    max_chunk_elements: int,
    sync_free: bool | None = None,
    clusters: tuple[int, int] | None = None,
    norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[`_temporal_density`] of `x` `(B, T, N, C)`, `T >= 2`, one chunk of videos at a time, returning `(rho, cutoff,
    labels)`. With `clusters = (num_clusters, k)`, DPC-KNN runs on every frame from the diagonal blocks of the same
    Gram matrices (one batched `bmm` per chunk, into a contiguous `(v*T, N, N)` buffer) and its labels `(B*T, N)` are
    returned, else `None`. With `norms` `(B, T, N, 1)` (clamped token norms), `x` is raw and
    is normalised chunk by chunk into a reused buffer (the same division as [`_normalize`], without a full-size
    copy); otherwise `x` is already normalised."""
    b, t, n, c = x.shape
    below, above, weight = _quantile_positions((t - 1) * n * n, dc_ratio, x.dtype)
    # a Python float (exactly the float32/64 weight): no host-to-device copy
    weight = float(weight)
    sync_free = x.device.type != "cpu" if sync_free is None else sync_free

    # the CPU path takes one video at a time (its blocks stay in cache, and its quantile selection is per video); the
    # sync-free path as many videos as max_chunk_elements allows
    videos_per_chunk = max(1, min(b, max_chunk_elements // ((t * n) ** 2))) if sync_free else 1
    rho = torch.empty(b, t, n, dtype=x.dtype, device=x.device)
    cutoff = torch.empty(b, t, dtype=x.dtype, device=x.device)
    labels = None if clusters is None else torch.empty(b * t, n, dtype=torch.long, device=x.device)
    tokens = None if norms is None else torch.empty(videos_per_chunk, t, n, c, dtype=x.dtype, device=x.device)
    gram_buffer = torch.empty(videos_per_chunk, t * n, t * n, dtype=x.dtype, device=x.device)
    # each frame's own Gram matrix (DPC-KNN) in a compact buffer, which DPC-KNN's several passes read from cache,
    # rather than as strided blocks of the clip's Gram matrix
    frames_shape = (videos_per_chunk * t, n, n)
    frames_buffer = None if clusters is None else torch.empty(frames_shape, dtype=x.dtype, device=x.device)
    dist_buffer = torch.empty(videos_per_chunk, n, (t - 1) * n, dtype=x.dtype, device=x.device)
    work_buffer = torch.empty_like(dist_buffer)
    for start in range(0, b, videos_per_chunk):
        end = min(start + videos_per_chunk, b)
        v = end - start
        chunk = x[start:end] if norms is None else torch.div(x[start:end], norms[start:end], out=tokens[:v])
        gram = gram_buffer[:v]
        _upper_gram(chunk.reshape(v, t * n, c), t, n, gram)
        if clusters is not None:
            frames = chunk.reshape(v * t, n, c)
            frames = torch.bmm(frames, frames.transpose(1, 2), out=frames_buffer[: v * t])
            labels[start * t : end * t] = _dpc_from_gram(frames, c, *clusters)[0]
        rho[start:end], cutoff[start:end] = _video_density(
            gram, t, dist_buffer[:v], work_buffer[:v], below, above, weight, sync_free
        )
    return rho.div_(n), cutoff, labels


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
    elements and sorts everything; an exact selection among the few candidates that can hold the quantile (see
    `_largest_candidates`) gives the same order statistics.

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
    _check_tokens(x, "x", 4, "(batch_size, num_frames, num_tokens, hidden_size)", check_finite=False)
    _check_dc_ratio(dc_ratio)
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    dc_ratio, k, max_chunk_elements = float(dc_ratio), int(k), int(max_chunk_elements)
    with _autocast_disabled(x), exact_float32_matmul():
        x = _normalize(x, "x")
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
    _check_tokens(x, "x", 4, "(batch_size, num_frames, num_tokens, hidden_size)", check_finite=False)
    _check_dc_ratio(dc_ratio)
    _check_positive_int(k, "k")
    _check_positive_int(max_chunk_elements, "max_chunk_elements")
    dc_ratio, k, max_chunk_elements = float(dc_ratio), int(k), int(max_chunk_elements)
    b, t, n, c = x.shape
    num_keep = num_visible_tokens(n, mask_ratio)
    with _autocast_disabled(x), exact_float32_matmul():
        x, norms = _token_norms(x, "x")
        return _cluster_wise_mask(x, num_keep, dc_ratio, k, max_chunk_elements, norms=norms)


def _cluster_wise_mask(
    x: torch.Tensor,
    num_keep: int,
    dc_ratio: float,
    k: int,
    max_chunk_elements: int,
    sync_free: bool | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """[`cluster_wise_mask`] on validated tokens, normalised already or (with `norms`, their clamped norms
    `(B, T, N, 1)`) normalised here: no host sync on a GPU (or with `sync_free=True`)."""
    b, t, n, c = x.shape
    if t == 1:
        x = x if norms is None else x / norms.expand_as(x)
        labels, _, rho = _dpc_knn(x.reshape(b * t, n, c), num_keep, k, max_chunk_elements)
    else:
        # one pass over the videos: the Gram matrix of every video serves both DPC-KNN (diagonal blocks) and the
        # temporal density (blocks s < u)
        rho, _, labels = _clip_pass(x, dc_ratio, max_chunk_elements, sync_free, (num_keep, k), norms)
        rho = rho.reshape(b * t, n)
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
from typing import Any  # noqa: E402


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
    mask = _per_sample(
        lambda rows, g: attention_guided_mask(cls_attention[rows], mask_ratio, g), batch_size, generator
    )
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
MASK_STRATEGY_NAMES: tuple[str, ...] = tuple(MASK_STRATEGIES)
# What cluster masking clusters: the teacher's tokens or the student's patch embeddings.
MASK_FEATURES: tuple[str, ...] = ("teacher", "patch")


def validate_masking_arguments(args: Any) -> None:
    """The one check of the masking settings (`mask_strategy`, `mask_ratio`, `dc_ratio`, `dpc_k`, `mask_features`)
    of the pretraining arguments and of the target cache writer; raises `ValueError` naming the flag."""
    if args.mask_strategy not in MASK_STRATEGY_NAMES:
        raise ValueError(f"--mask_strategy must be one of {MASK_STRATEGY_NAMES}, got {args.mask_strategy!r}.")
    if not (isinstance(args.mask_ratio, (int, float)) and 0.0 <= args.mask_ratio < 1.0):
        raise ValueError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}.")
    if not 0.0 < args.dc_ratio < 1.0:
        raise ValueError(f"--dc_ratio must be in (0, 1), got {args.dc_ratio}.")
    if args.dpc_k < 1:
        raise ValueError(f"--dpc_k must be >= 1, got {args.dpc_k}.")
    if args.mask_features not in MASK_FEATURES:
        raise ValueError(f"--mask_features must be one of {MASK_FEATURES}, got {args.mask_features!r}.")


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
