"""Tests of the masking algorithms (DPC-KNN, temporal density, cluster-wise masking and the baselines)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterstm.models.masking_clusterstm import (
    _temporal_density,
    attention_guided_mask,
    cluster_wise_mask,
    dpc_knn,
    num_visible_tokens,
    random_mask,
    temporal_density,
    tube_mask,
)

# ---------------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references (plain Python loops over frames and tokens)
# ---------------------------------------------------------------------------------------------------------------------


def ref_dpc_frame(frame: torch.Tensor, num_clusters: int, k: int = 5):
    """DPC-KNN for one frame (N, C), written token by token."""
    x = frame.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n, c = x.shape
    k = min(k, n)
    d = [[float(torch.linalg.norm(x[i] - x[j])) / math.sqrt(c) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(sorted(v * v for v in d[i])[:k]) / k) for i in range(n)]
    d_max = max(max(row) for row in d)
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(d[i][j] for j in denser) if denser else d_max)
    score = [rho[i] * delta[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:num_clusters]
    labels = []
    for i in range(n):
        if i in centers:
            labels.append(centers.index(i))
            continue
        best = 0
        for position, center in enumerate(centers):
            if d[i][center] < d[i][centers[best]]:
                best = position
        labels.append(best)
    return labels, centers, rho


def ref_temporal_density(x: torch.Tensor, dc_ratio: float):
    """Temporal density (B, T, N) and cut-off (B, T) with torch.quantile on each frame's distance list."""
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b, t, n, _ = x.shape
    rho = torch.zeros(b, t, n, dtype=torch.float64)
    cutoff = torch.zeros(b, t, dtype=torch.float64)
    for bi in range(b):
        for ti in range(t):
            rows = []
            for i in range(n):
                rows.append([1.0 - float(x[bi, ti, i] @ x[bi, u, j]) for u in range(t) if u != ti for j in range(n)])
            dc = float(torch.quantile(torch.tensor(rows, dtype=torch.float64).flatten(), dc_ratio))
            dc = max(dc, 1e-6)
            cutoff[bi, ti] = dc
            for i in range(n):
                rho[bi, ti, i] = sum(math.exp(-((v / dc) ** 2)) for v in rows[i]) / n
    return rho, cutoff


def ref_cluster_wise_mask(x: torch.Tensor, mask_ratio: float, dc_ratio: float = 0.02, k: int = 5):
    b, t, n, _ = x.shape
    num_keep = n - int(n * mask_ratio)
    if t > 1:
        temporal, _ = ref_temporal_density(x, dc_ratio)
    mask = torch.ones(b, t, n, dtype=torch.bool)
    for bi in range(b):
        for ti in range(t):
            labels, _, local_rho = ref_dpc_frame(x[bi, ti], num_keep, k)
            rho = temporal[bi, ti].tolist() if t > 1 else local_rho
            for cluster in range(num_keep):
                members = [i for i in range(n) if labels[i] == cluster]
                best = max(members, key=lambda i: (rho[i], -i))
                mask[bi, ti, best] = False
    return mask


def partition(labels: torch.Tensor) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for index, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(index)
    return {frozenset(group) for group in groups.values()}


# ---------------------------------------------------------------------------------------------------------------------
# num_visible_tokens
# ---------------------------------------------------------------------------------------------------------------------


def test_num_visible_tokens():
    assert num_visible_tokens(196, 0.8) == 40  # int(156.8) = 156 masked
    assert num_visible_tokens(196, 0.75) == 49
    assert num_visible_tokens(256, 0.9) == 26
    assert num_visible_tokens(10, 0.0) == 10
    assert num_visible_tokens(10, 0.99) == 1
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="mask_ratio"):
            num_visible_tokens(10, bad)
    with pytest.raises(ValueError, match="num_tokens"):
        num_visible_tokens(0, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Hand-checkable cases
# ---------------------------------------------------------------------------------------------------------------------


def test_two_obvious_clusters():
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    noise = torch.tensor([[0.0, 0.0, 0.05, 0.0], [0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.05]])
    frame = torch.stack([e1, e2, e1, e2]) + noise
    labels, centers = dpc_knn(frame[None], num_clusters=2, k=2)
    assert partition(labels[0]) == {frozenset({0, 2}), frozenset({1, 3})}
    assert centers.shape == (1, 2)
    assert labels[0, centers[0]].tolist() == [0, 1]

    mask = cluster_wise_mask(frame[None, None].repeat(1, 2, 1, 1), mask_ratio=0.5, k=2)
    kept = (~mask).nonzero()[:, 2].view(2, 2)
    for frame_kept in kept.tolist():
        assert len({t % 2 for t in frame_kept}) == 2  # one token of each cluster


def test_duplicated_tokens_keep_first_indices():
    # every token identical: all densities tie, every score is 0, so the centres are tokens 0..K-1, all other tokens
    # join the first centre, and each cluster keeps its lowest index -> exactly tokens 0..K-1 are kept.
    x = torch.zeros(2, 3, 9, 4)
    x[..., 0] = 1.0
    labels, centers = dpc_knn(x.reshape(6, 9, 4), num_clusters=3)
    assert centers.tolist() == [[0, 1, 2]] * 6
    assert labels.tolist() == [[0, 1, 2, 0, 0, 0, 0, 0, 0]] * 6
    mask = cluster_wise_mask(x, mask_ratio=0.7)
    expected = torch.ones(2, 3, 9, dtype=torch.bool)
    expected[..., :3] = False
    assert torch.equal(mask, expected)


def test_temporal_density_hand_values():
    e = torch.eye(2)
    x = torch.stack([e, e])[None]  # B=1, T=2, N=2: distances of each frame are [[0, 1], [1, 0]]
    # quantile 0.02 of [0, 0, 1, 1] is 0 -> clamped to 1e-6; only the zero distance contributes: (1 + 0) / 2
    assert torch.allclose(temporal_density(x), torch.full((1, 2, 2), 0.5))
    # quantile 0.5 of [0, 0, 1, 1] is 0.5: (exp(0) + exp(-(1 / 0.5)^2)) / 2
    expected = (1 + math.exp(-4)) / 2
    assert torch.allclose(temporal_density(x, dc_ratio=0.5), torch.full((1, 2, 2), expected))
    # raw (unnormalised) features give the same result: normalisation happens inside
    assert torch.allclose(temporal_density(3.0 * x, dc_ratio=0.5), torch.full((1, 2, 2), expected))


def test_static_video_keeps_the_same_tokens_in_every_frame():
    torch.manual_seed(0)
    # float64: the copies of a token are at distance ~1e-16, far below the 1e-6 cut-off clamp (in float32 the
    # ~1e-7 rounding of 1 - <x, x> is comparable to the clamp and decides between near-equal densities)
    frame = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    video = frame.repeat(2, 4, 1, 1)
    mask = cluster_wise_mask(video, mask_ratio=0.75)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert ((~mask).sum(-1) == 4).all()
    assert torch.equal(mask, ref_cluster_wise_mask(video[:1], 0.75).expand_as(mask))


def test_single_frame_uses_local_density():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 12, 6, dtype=torch.float64)
    rho = temporal_density(x)
    for b in range(2):
        _, _, local_rho = ref_dpc_frame(x[b, 0], 1)
        assert torch.allclose(rho[b, 0], torch.tensor(local_rho, dtype=torch.float64), atol=1e-12)
    assert torch.equal(cluster_wise_mask(x, 0.5), ref_cluster_wise_mask(x, 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the slow references
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n,c,num_clusters,k", [(0, 12, 8, 3, 5), (1, 16, 4, 5, 3), (2, 9, 16, 9, 20)])
def test_dpc_knn_matches_reference(seed, n, c, num_clusters, k):
    torch.manual_seed(seed)
    x = torch.randn(3, n, c, dtype=torch.float64)
    labels, centers = dpc_knn(x, num_clusters, k=k)
    for row in range(3):
        ref_labels, ref_centers, _ = ref_dpc_frame(x[row], num_clusters, k)
        assert centers[row].tolist() == ref_centers
        assert labels[row].tolist() == ref_labels


@pytest.mark.parametrize("dc_ratio", [0.02, 0.3, 1.0, 0.0])
def test_temporal_density_matches_reference(dc_ratio):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    ref_rho, ref_cutoff = ref_temporal_density(x, dc_ratio)
    normalized = torch.nn.functional.normalize(x, dim=-1)
    rho, cutoff = _temporal_density(normalized, dc_ratio, max_chunk_elements=1)
    assert torch.allclose(cutoff, ref_cutoff, atol=1e-12)
    assert torch.allclose(rho, ref_rho, atol=1e-12)
    assert torch.allclose(temporal_density(x, dc_ratio), ref_rho, atol=1e-12)


def test_temporal_cutoff_equals_torch_quantile_in_float32():
    # the interpolation weight is computed in the input dtype exactly as torch.quantile does
    torch.manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(1, 4, 16, 8), dim=-1)
    for dc_ratio in (0.02, 0.13, 0.77):
        _, cutoff = _temporal_density(x, dc_ratio, max_chunk_elements=2**20)
        for t in range(4):
            others = torch.cat([x[0, u] for u in range(4) if u != t])
            dist = 1 - x[0, t] @ others.T
            assert torch.allclose(cutoff[0, t], torch.quantile(dist.flatten(), dc_ratio), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,t,n,ratio", [(5, 3, 16, 0.75), (6, 2, 9, 0.5), (7, 4, 12, 0.9)])
def test_cluster_wise_mask_matches_reference(seed, t, n, ratio):
    torch.manual_seed(seed)
    x = torch.randn(2, t, n, 6, dtype=torch.float64)
    assert torch.equal(cluster_wise_mask(x, ratio), ref_cluster_wise_mask(x, ratio))


# ---------------------------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------------------------


def test_batch_and_chunk_equivalence():
    torch.manual_seed(8)
    x = torch.randn(3, 4, 16, 12)
    mask = cluster_wise_mask(x, 0.75)
    one_by_one = torch.cat([cluster_wise_mask(x[i : i + 1], 0.75) for i in range(3)])
    assert torch.equal(mask, one_by_one)
    assert torch.equal(mask, cluster_wise_mask(x, 0.75, max_chunk_elements=1))
    rho = temporal_density(x)
    assert torch.allclose(rho, torch.cat([temporal_density(x[i : i + 1]) for i in range(3)]), atol=1e-6)


def test_determinism():
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 8)
    assert torch.equal(cluster_wise_mask(x, 0.8), cluster_wise_mask(x.clone(), 0.8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    torch.manual_seed(10)
    x = torch.randn(2, 3, 9, 8).to(dtype)
    mask = cluster_wise_mask(x, 0.6)
    assert mask.dtype == torch.bool and mask.device == x.device and mask.shape == (2, 3, 9)
    # low precision inputs are computed in float32: same as upcasting first
    assert torch.equal(mask, cluster_wise_mask(x.float(), 0.6))
    rho = temporal_density(x)
    assert rho.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    labels, centers = dpc_knn(x[0], 4)
    assert labels.dtype == centers.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(11)
    x = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    mask = cluster_wise_mask(x.cuda(), 0.75)
    assert mask.device.type == "cuda"
    assert torch.equal(mask.cpu(), cluster_wise_mask(x, 0.75))
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert random_mask(2, 3, 16, 0.5, generator=generator).device.type == "cuda"


def test_relabelling_invariance():
    torch.manual_seed(12)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    perm = torch.randperm(16)
    labels, _ = dpc_knn(x.reshape(6, 16, 8), 4)
    labels_p, _ = dpc_knn(x[:, :, perm].reshape(6, 16, 8), 4)
    for row in range(6):
        # token j of the permuted frame is token perm[j] of the original
        mapped = {frozenset(perm[j].item() for j in group) for group in partition(labels_p[row])}
        assert mapped == partition(labels[row])
    mask = cluster_wise_mask(x, 0.75)
    assert torch.equal(cluster_wise_mask(x[:, :, perm], 0.75), mask[:, :, perm])
    # the order of the frames does not matter either
    frame_perm = torch.tensor([2, 0, 1])
    assert torch.equal(cluster_wise_mask(x[:, frame_perm], 0.75), mask[:, frame_perm])


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    n=st.integers(1, 20),
    c=st.integers(1, 6),
    ratio=st.floats(0.0, 0.99),
    discrete=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masking_invariants(b, t, n, c, ratio, discrete, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, n, c, generator=generator)
    if discrete:
        # few distinct values: many exact ties and duplicated tokens (zero vectors included)
        x = x.round().clamp(-1, 1)
    num_keep = num_visible_tokens(n, ratio)
    mask = cluster_wise_mask(x, ratio)
    assert mask.shape == (b, t, n) and mask.dtype == torch.bool
    assert ((~mask).sum(-1) == num_keep).all()

    labels, centers = dpc_knn(x.reshape(b * t, n, c), num_keep)
    assert labels.min() >= 0 and labels.max() < num_keep
    assert (torch.sort(centers, dim=-1).values.unique_consecutive(dim=-1).shape[-1]) == num_keep
    assert torch.equal(labels.gather(1, centers), torch.arange(num_keep).expand(b * t, num_keep))
    # every cluster keeps exactly one token
    kept_labels = torch.sort(labels.masked_select(~mask.reshape(b * t, n)).view(b * t, num_keep), dim=-1).values
    assert torch.equal(kept_labels, torch.arange(num_keep).expand(b * t, num_keep))

    for baseline in (random_mask(b, t, n, ratio, generator=generator), tube_mask(b, t, n, ratio, generator=generator)):
        assert ((~baseline).sum(-1) == num_keep).all()
    attention = torch.rand(b, t, n, generator=generator) * torch.randint(0, 2, (b, t, n), generator=generator)
    assert ((~attention_guided_mask(attention, ratio, generator=generator)).sum(-1) == num_keep).all()


# ---------------------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------------------


def test_random_and_tube_masks_are_reproducible():
    def make(fn, seed):
        return fn(2, 4, 16, 0.75, generator=torch.Generator().manual_seed(seed))

    for fn in (random_mask, tube_mask):
        assert torch.equal(make(fn, 0), make(fn, 0))
        assert not torch.equal(make(fn, 0), make(fn, 1))
        mask = make(fn, 0)
        assert mask.shape == (2, 4, 16) and ((~mask).sum(-1) == 4).all()
    tube = make(tube_mask, 0)
    assert torch.equal(tube, tube[:, :1].expand_as(tube))
    rand = make(random_mask, 0)
    assert not torch.equal(rand, rand[:, :1].expand_as(rand))
    assert random_mask(1, 1, 4, 0.5, device="cpu").device.type == "cpu"


def test_attention_guided_mask_follows_the_attention():
    attention = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(2000, 1, 4)
    generator = torch.Generator().manual_seed(0)
    mask = attention_guided_mask(attention, 0.75, generator=generator)  # keep 1 of 4
    assert ((~mask).sum(-1) == 1).all()
    frequency = (~mask[:, 0, 0]).double().mean().item()
    assert abs(frequency - 0.7) < 0.04  # binomial std ~0.01

    # zero attention is never sampled while enough positive tokens remain; all-zero frames are uniform
    attention = torch.tensor([[[0.0, 1.0, 0.0, 2.0, 0.0, 1.0]], [[0.0] * 6]])
    mask = attention_guided_mask(attention, 0.5, generator=torch.Generator().manual_seed(1))
    assert (~mask[0, 0]).nonzero().flatten().tolist() == [1, 3, 5]
    assert ((~mask).sum(-1) == 3).all()

    again = attention_guided_mask(attention, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    mask_bf16 = attention_guided_mask(attention.bfloat16(), 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, mask_bf16)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    x = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="rank 4"):
        cluster_wise_mask(x[0], 0.5)
    with pytest.raises(ValueError, match="rank 3"):
        dpc_knn(x, 2)
    with pytest.raises(ValueError, match="rank 4"):
        temporal_density(x[0])
    with pytest.raises(ValueError, match="mask_ratio"):
        cluster_wise_mask(x, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        cluster_wise_mask(x, -0.2)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 1, 2, 0] = bad
        with pytest.raises(ValueError, match="non-finite"):
            cluster_wise_mask(y, 0.5)
        with pytest.raises(ValueError, match="non-finite"):
            attention_guided_mask(y[..., 0], 0.5)
    with pytest.raises(ValueError, match="floating point"):
        cluster_wise_mask(x.long(), 0.5)
    with pytest.raises(ValueError, match="num_clusters"):
        dpc_knn(x[0], 0)
    with pytest.raises(ValueError, match="num_clusters"):
        dpc_knn(x[0], 5)
    with pytest.raises(ValueError, match="dc_ratio"):
        temporal_density(x, dc_ratio=1.5)
    with pytest.raises(ValueError, match="k"):
        dpc_knn(x[0], 2, k=0)
    with pytest.raises(ValueError, match="non-negative"):
        attention_guided_mask(-x[..., 0].abs() - 1, 0.5)
    with pytest.raises(ValueError, match="rank 3"):
        attention_guided_mask(x, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        random_mask(0, 2, 4, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        tube_mask(1, 2, 4, 1.2)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    torch.manual_seed(13)
    x = torch.randn(1, 2, 9, 4)
    assert num_visible_tokens(np.int64(196), np.float32(0.75)) == 49
    assert torch.equal(cluster_wise_mask(x, np.float64(0.5), k=np.int64(5)), cluster_wise_mask(x, 0.5))
    labels, _ = dpc_knn(x[0], np.int64(3))
    assert labels.shape == (2, 9)


def test_quantile_selection_matches_torch_quantile_beyond_float32_integers():
    # torch.quantile computes the rank q * (n - 1) in the input dtype; at n = 10^6 + 1 in float32 that rank is
    # 129999.99 rather than 130000, and the exact partial selection must reproduce that value
    from clusterstm.models.masking_clusterstm import _descending_pair, _quantile_positions

    n = 1_000_001
    values = torch.arange(n, dtype=torch.float32)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    below, above, weight = _quantile_positions(n, 0.13, torch.float32)
    # the k-th smallest value is minus the k-th largest of the negated values
    largest_below, largest_above = _descending_pair(-values[None], below, above)
    ours = torch.lerp(-largest_below, -largest_above, weight)[0]
    assert ours.item() == torch.quantile(values, 0.13).item() == 129999.9921875


def test_inputs_requiring_grad_build_no_graph():
    torch.manual_seed(14)
    x = torch.randn(1, 2, 9, 4, requires_grad=True)
    rho = temporal_density(x)
    assert not rho.requires_grad
    assert torch.equal(cluster_wise_mask(x, 0.5), cluster_wise_mask(x.detach(), 0.5))
    attention = torch.rand(1, 2, 9, requires_grad=True)
    assert attention_guided_mask(attention, 0.5, generator=torch.Generator().manual_seed(0)).shape == (1, 2, 9)


# ---------------------------------------------------------------------------------------------------------------------
# Full-precision GEMMs, exact quantile selection, host-sync-free path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_matmul_precision():
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)  # also restores allow_tf32 and the per-backend values


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_exact_float32_matmul_restores_the_global_setting(precision, restore_matmul_precision):
    from clusterstm.models.masking_clusterstm import exact_float32_matmul

    torch.set_float32_matmul_precision(precision)
    assert torch.backends.cuda.matmul.allow_tf32
    with exact_float32_matmul():
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == precision and torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(RuntimeError, match="inside"), exact_float32_matmul():
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == precision and torch.backends.cuda.matmul.allow_tf32


def test_exact_float32_matmul_with_the_per_backend_api(restore_matmul_precision):
    from clusterstm.models.masking_clusterstm import exact_float32_matmul

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")
    matmul.fp32_precision = "tf32"
    with exact_float32_matmul():
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == "tf32"
    matmul.fp32_precision = "ieee"


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_masks_ignore_a_reduced_global_matmul_precision(precision, restore_matmul_precision):
    torch.manual_seed(15)
    x = torch.randn(2, 3, 16, 8)  # float32: the only dtype the setting applies to
    expected = ref_cluster_wise_mask(x, 0.75)
    torch.set_float32_matmul_precision(precision)
    assert torch.equal(cluster_wise_mask(x, 0.75), expected)
    assert torch.equal(temporal_density(x), temporal_density(x))
    assert torch.get_float32_matmul_precision() == precision  # restored after the call


def _frame_values(gram: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """Frame s's values as stored by _upper_gram: its row block (u > s) and column block (u < s)."""
    rows = slice(s * n, (s + 1) * n)
    return torch.cat([gram[:, rows, (s + 1) * n :].flatten(1), gram[:, : s * n, rows].flatten(1)], dim=1)


def _gram_cases():
    generator = torch.Generator().manual_seed(16)
    t, n = 4, 12
    size = t * n
    random = torch.randn(2, size, size, generator=generator)
    ties = torch.randint(0, 4, (2, size, size), generator=generator).float()
    constant = torch.full((2, size, size), 0.25)
    # the largest values packed into a few rows, i.e. into few row groups: the candidates are whole groups
    packed = torch.rand(2, size, size, generator=generator)
    packed[:, 0:3] += 10.0
    packed[:, :, 5 * n // 4] += 10.0
    return {"random": random, "ties": ties, "constant": constant, "packed": packed}, t, n


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("q", [0.0, 0.02, 0.13, 0.5, 1.0])
def test_quantile_candidates_match_torch_quantile(sync_free, q):
    from clusterstm.models.masking_clusterstm import _descending_pair, _largest_candidates, _quantile_positions

    cases, t, n = _gram_cases()
    below, above, weight = _quantile_positions((t - 1) * n * n, q, torch.float32)
    for name, gram in cases.items():
        for s in range(t):
            # the quantile of the distances 1 - g is 1 - the (1 - q) quantile of g: compare the order statistics
            values = _frame_values(gram, s, n)
            largest = torch.sort(values, dim=1, descending=True).values
            if sync_free:
                candidates = _largest_candidates(gram, s, n, above + 1, sync_free=True)
            else:  # the CPU path handles one video at a time
                pairs = [
                    _descending_pair(_largest_candidates(gram[i : i + 1], s, n, above + 1, False), below, above)
                    for i in range(2)
                ]
                got_below, got_above = (torch.cat(values) for values in zip(*pairs))
            if sync_free:
                got_below, got_above = _descending_pair(candidates, below, above)
            assert torch.equal(got_below, largest[:, below]), (name, s)
            assert torch.equal(got_above, largest[:, above]), (name, s)
            # and the interpolated cut-off is torch.quantile's (the order statistics above are exact; torch.quantile
            # interpolates with its own formula, which may differ from torch.lerp in the last bit)
            ours = torch.lerp(1 - got_below, 1 - got_above, weight)
            assert torch.allclose(ours, torch.quantile(1 - values, q, dim=1), rtol=0, atol=1e-6), (name, s)


@pytest.mark.parametrize("dc_ratio", [0.02, 0.3])
def test_sync_free_temporal_density_matches_reference(dc_ratio):
    torch.manual_seed(17)
    x = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    ref_rho, ref_cutoff = ref_temporal_density(x, dc_ratio)
    normalized = torch.nn.functional.normalize(x, dim=-1)
    for sync_free in (False, True):
        rho, cutoff = _temporal_density(normalized, dc_ratio, max_chunk_elements=2**20, sync_free=sync_free)
        assert torch.allclose(cutoff, ref_cutoff, atol=1e-12)
        assert torch.allclose(rho, ref_rho, atol=1e-12)


def test_sync_free_path_gives_the_same_masks():
    from clusterstm.models.masking_clusterstm import _cluster_wise_mask

    torch.manual_seed(18)
    x = torch.nn.functional.normalize(torch.randn(3, 4, 49, 16), dim=-1)
    cpu = _cluster_wise_mask(x, 10, 0.02, 5, 2**25, sync_free=False)
    assert torch.equal(_cluster_wise_mask(x, 10, 0.02, 5, 2**25, sync_free=True), cpu)
    assert torch.equal(_cluster_wise_mask(x, 10, 0.02, 5, 1, sync_free=True), cpu)  # one video per chunk
    assert torch.equal(cluster_wise_mask(x, 0.8), cpu)


def test_sync_free_path_reads_no_value_on_the_host():
    # meta tensors carry no data: any .item(), bool(tensor), .cpu() or data-dependent shape (nonzero, masked_select)
    # raises on them, so the sync-free path running end to end on meta proves it never needs one
    from clusterstm.models.masking_clusterstm import _cluster_wise_mask

    x = torch.empty(2, 3, 16, 8, device="meta")
    mask = _cluster_wise_mask(x, 4, 0.02, 5, 2**25, sync_free=True)
    assert mask.shape == (2, 3, 16) and mask.dtype == torch.bool and mask.device.type == "meta"
    # the check can fail: the CPU path (data-dependent compaction) does not run on meta
    with pytest.raises((NotImplementedError, RuntimeError)):
        _cluster_wise_mask(x, 4, 0.02, 5, 2**25, sync_free=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
def test_cuda_masking_has_no_host_sync_after_validation():
    from clusterstm.models.masking_clusterstm import _cluster_wise_mask

    torch.manual_seed(19)
    x = torch.nn.functional.normalize(torch.randn(2, 4, 16, 8, dtype=torch.float64), dim=-1)
    expected = cluster_wise_mask(x, 0.75)
    device_x = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = _cluster_wise_mask(device_x, 4, 0.02, 5, 2**25)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(mask.cpu(), expected)


def test_tokens_too_large_to_normalise_are_refused():
    x = torch.full((1, 2, 4, 3), 1e30)  # finite, but the squared norm overflows float32
    with pytest.raises(ValueError, match="too large"):
        cluster_wise_mask(x, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Fast paths of the GEMM-bound implementation (issue 17): each against a plain computation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 12, 13, 49, 196])
@pytest.mark.parametrize("discrete", [False, True])
def test_smallest_sorted_equals_topk(n, discrete):
    from clusterstm.models.masking_clusterstm import _smallest_sorted

    generator = torch.Generator().manual_seed(n)
    values = torch.rand(3, 7, n, generator=generator)
    if discrete:  # many exact ties, also across the candidate groups
        values = (values * 3).floor()
    for k in sorted({1, min(3, n), min(5, n), n}):
        expected = torch.topk(values, k, dim=-1, largest=False).values
        assert torch.equal(_smallest_sorted(values, k), expected), k


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("diagonal", [False, True])
def test_upper_gram_writes_only_the_blocks_it_promises(t, diagonal):
    from clusterstm.models.masking_clusterstm import _diagonal_blocks, _upper_gram

    n, c = 4, 3
    x = torch.randn(2, t * n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    gram = torch.full((2, t * n, t * n), float("nan"), dtype=torch.float64)
    _upper_gram(x, t, n, gram, diagonal=diagonal)
    full = x @ x.transpose(1, 2)
    for s in range(t):
        for u in range(t):
            block = gram[:, s * n : (s + 1) * n, u * n : (u + 1) * n]
            if s < u or (s == u and diagonal):
                assert torch.allclose(block, full[:, s * n : (s + 1) * n, u * n : (u + 1) * n], atol=1e-12), (s, u)
            else:
                assert torch.isnan(block).all(), (s, u)
    if diagonal:
        frames = x.view(2, t, n, c)
        assert torch.allclose(_diagonal_blocks(gram, t), frames @ frames.transpose(2, 3), atol=1e-12)


@pytest.mark.parametrize("t,n", [(2, 1), (2, 12), (3, 13), (5, 6), (8, 14)])
@pytest.mark.parametrize("q", [0.0, 0.02, 0.5, 1.0])
def test_video_candidates_hold_every_frames_order_statistics(t, n, q):
    from clusterstm.models.masking_clusterstm import _descending_pair, _quantile_positions, _video_candidates

    generator = torch.Generator().manual_seed(t * 100 + n)
    size = t * n
    below, above, _ = _quantile_positions((t - 1) * n * n, q, torch.float32)
    cases = {
        "random": torch.randn(1, size, size, generator=generator),
        "ties": torch.randint(0, 3, (1, size, size), generator=generator).float(),
    }
    for name, gram in cases.items():
        got_below, got_above = _descending_pair(_video_candidates(gram, t, n, above + 1), below, above)
        for s in range(t):
            rows = slice(s * n, (s + 1) * n)
            values = torch.cat([gram[0, rows, (s + 1) * n :].flatten(), gram[0, : s * n, rows].flatten()])
            largest = torch.sort(values, descending=True).values
            assert got_below[s] == largest[below] and got_above[s] == largest[above], (name, s)


@settings(max_examples=12, deadline=None)
@given(
    t=st.integers(2, 4),
    n=st.sampled_from([1, 2, 3, 7, 10]),
    c=st.integers(2, 5),
    ratio=st.floats(0.0, 0.95),
    k=st.integers(1, 12),
    duplicated=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cluster_wise_mask_matches_reference_on_random_shapes(t, n, c, ratio, k, duplicated, seed):
    # DPC-KNN now runs on the diagonal blocks of each clip's Gram matrix, with a grouped k-smallest selection and a
    # rank penalty instead of a boolean mask: the masks must stay those of the slow float64 reference
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, n, c, dtype=torch.float64, generator=generator)
    if duplicated:  # bit-identical tokens inside a frame and across frames: exact distance ties
        x[:, :, n // 2 :] = x[:, :, : n - n // 2]
        x[:, 1] = x[:, 0]
        _assert_same_kept_tokens(x, cluster_wise_mask(x, ratio, k=k), ref_cluster_wise_mask(x, ratio, k=k))
    else:
        assert torch.equal(cluster_wise_mask(x, ratio, k=k), ref_cluster_wise_mask(x, ratio, k=k))


def _assert_same_kept_tokens(x: torch.Tensor, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Every frame of every clip keeps as many tokens, with the same contents. Which of several identical tokens a
    cluster keeps is a tie the GEMM's rounding may break either way (blocked kernels need not give identical rows
    bit-identical products), so with duplicated tokens the masks themselves may differ."""
    for clip in range(x.shape[0]):
        for frame in range(x.shape[1]):
            kept_got, kept_expected = x[clip, frame][~got[clip, frame]], x[clip, frame][~expected[clip, frame]]
            assert len(kept_got) == len(kept_expected), (clip, frame)
            assert torch.equal(kept_got.unique(dim=0), kept_expected.unique(dim=0)), (clip, frame)


def test_cluster_wise_mask_normalises_chunk_by_chunk_like_normalize():
    # the raw tokens are normalised one video at a time into a buffer: the same masks as from normalised inputs
    from clusterstm.models.masking_clusterstm import _cluster_wise_mask

    x = torch.randn(3, 4, 16, 8, generator=torch.Generator().manual_seed(20)) * 5
    normalised = torch.nn.functional.normalize(x, dim=-1)
    expected = _cluster_wise_mask(normalised, 4, 0.02, 5, 2**25)
    assert torch.equal(cluster_wise_mask(x, 0.75), expected)
    assert torch.equal(cluster_wise_mask(x, 0.75, max_chunk_elements=1), expected)


def test_estimated_rank_by_hand():
    from clusterstm.models.masking_clusterstm import _estimated_rank

    # the benchmark's frame: 7 * 196 * 196 values, count 5380, 9604 maxima of 28 values:
    # q = (1.05 * 5380 + 4 * sqrt(5380)) / 268912 = 0.0220979, p = 1 - (1 - q) ** 28 = 0.465098,
    # p * 9604 = 4466.8, plus 2 * sqrt(9604 * p * (1 - p)) = 97.8: 4564.6
    assert _estimated_rank(5380, 268912, 28, 9604) == 4564
    assert _estimated_rank(5380, 268912, 1, 268912) == 5380  # groups of one value: never above count
    assert _estimated_rank(69, 3364, 29, 116) == 69  # few values: the margin leaves nothing to gain
    assert _estimated_rank(3, 10, 5, 2) == 2  # q capped at 1: every maximum
    assert _estimated_rank(50, 100, 10, 10) == 10  # never above the number of maxima
    assert _estimated_rank(1, 10**6, 2, 100) == 1  # at least one


def _frame_order_statistics(gram: torch.Tensor, t: int, n: int, below: int, above: int):
    """The below-th and above-th largest (0-based) of each frame's values, by a full sort."""
    largest = []
    for s in range(t):
        rows = slice(s * n, (s + 1) * n)
        values = torch.cat([gram[0, rows, (s + 1) * n :].flatten(), gram[0, : s * n, rows].flatten()])
        largest.append(torch.sort(values, descending=True).values[[below, above]])
    return torch.stack(largest).unbind(1)


@pytest.fixture
def count_kthvalue(monkeypatch):
    # the number of values each kthvalue call selects among, call by call
    calls = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(
        torch,
        "kthvalue",
        lambda values, *args, **kwargs: calls.append(values.shape[-1]) or kthvalue(values, *args, **kwargs),
    )
    return calls


@pytest.mark.parametrize("t,n", [(4, 196), (3, 13), (5, 28)])
def test_video_candidates_fall_back_to_the_bound_when_the_estimate_keeps_too_few(t, n, count_kthvalue, monkeypatch):
    # an estimate that keeps too few values (here: the largest maximum only) must be caught by the count check and
    # replaced by the bound, with the exact order statistics in the end; on tied values the same estimate may keep
    # enough already (one selection), which must be exact too
    from clusterstm.models import masking_clusterstm
    from clusterstm.models.masking_clusterstm import _descending_pair, _quantile_positions, _video_candidates

    monkeypatch.setattr(masking_clusterstm, "_estimated_rank", lambda *args: 1)
    size = t * n
    below, above, _ = _quantile_positions((t - 1) * n * n, 0.02, torch.float32)
    generator = torch.Generator().manual_seed(21)
    cases = {
        "random": torch.rand(1, size, size, generator=generator),
        "ties": torch.randint(0, 4, (1, size, size), generator=generator).float(),
    }
    for name, gram in cases.items():
        count_kthvalue.clear()
        got_below, got_above = _descending_pair(_video_candidates(gram, t, n, above + 1), below, above)
        expected_below, expected_above = _frame_order_statistics(gram, t, n, below, above)
        assert torch.equal(got_below, expected_below) and torch.equal(got_above, expected_above), name
        if name == "random" and above > 0:
            assert len(count_kthvalue) == 2  # the estimate, then the bound


@pytest.mark.parametrize("t,n,c,sample", [(4, 49, 64, 7 * 4 * 49), (8, 196, 32, 7 * 8 * 49)])
def test_video_candidates_take_the_estimate_on_gaussian_tokens(t, n, c, sample, count_kthvalue):
    # the common case: the tight threshold alone keeps enough values (one selection, among every coarse maximum or,
    # at the benchmark's size, among every fourth), with the exact order statistics
    from clusterstm.models.masking_clusterstm import (
        _descending_pair,
        _quantile_positions,
        _upper_gram,
        _video_candidates,
    )

    below, above, _ = _quantile_positions((t - 1) * n * n, 0.02, torch.float32)
    for seed in range(2):
        x = torch.randn(1, t * n, c, generator=torch.Generator().manual_seed(seed))
        x = torch.nn.functional.normalize(x, dim=-1)
        gram = torch.empty(1, t * n, t * n)
        _upper_gram(x, t, n, gram)
        count_kthvalue.clear()
        got_below, got_above = _descending_pair(_video_candidates(gram, t, n, above + 1), below, above)
        assert count_kthvalue == [sample], seed
        expected_below, expected_above = _frame_order_statistics(gram, t, n, below, above)
        assert torch.equal(got_below, expected_below) and torch.equal(got_above, expected_above), seed


@pytest.mark.parametrize("n", [13, 49])
def test_cluster_wise_mask_matches_reference_with_duplicated_tokens_at_the_quantile(n):
    # duplicated tokens and frames put exact ties right at the cut-off's order statistics
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(1, 4, n, 6, dtype=torch.float64, generator=generator)
    x[:, :, n // 3 :] = x[:, :, : n - n // 3]
    x[:, 2] = x[:, 0]
    _assert_same_kept_tokens(x, cluster_wise_mask(x, 0.75), ref_cluster_wise_mask(x, 0.75))
    # in float32 (where duplicated tokens' near-ties fall differently than in float64) both quantile paths agree
    from clusterstm.models.masking_clusterstm import _cluster_wise_mask

    normalized = torch.nn.functional.normalize(x.float(), dim=-1)
    num_keep = n - int(n * 0.75)
    cpu = _cluster_wise_mask(normalized, num_keep, 0.02, 5, 2**25, sync_free=False)
    assert torch.equal(_cluster_wise_mask(normalized, num_keep, 0.02, 5, 2**25, sync_free=True), cpu)
