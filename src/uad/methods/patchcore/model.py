"""PatchCore building blocks (Roth et al., CVPR 2022) as pure torch functions.

* :func:`aggregate_patches` — locally aware patch features (Sec. 3.1, eq. 1-2): average pooling
  over a p x p neighbourhood of each stage map, deeper maps upsampled to the shallowest map,
  concatenated and reduced to ``target_dim`` channels by adaptive average pooling.
* :func:`greedy_coreset` — greedy k-center coreset selection (Sec. 3.2, Algorithm 1, after Sener &
  Savarese 2018) on a Johnson-Lindenstrauss random projection of the features.
* :func:`nearest_neighbors` — chunked exact k-NN (Euclidean) against the memory bank (eq. 6).
* :func:`reweighted_image_score` — the image-score re-weighting of eq. 7.
* :func:`smooth_maps` — bilinear upsampling + Gaussian smoothing (sigma 4) of the patch-score map.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..common.features import local_average, to_common_grid


def aggregate_patches(maps: Sequence[torch.Tensor], neighbourhood: int = 3, target_dim: int = 1024) -> torch.Tensor:
    """Locally aware patch features, eq. 1-2: ``[(B, C_i, h_i, w_i)] -> (B, target_dim, h_0, w_0)``.

    Each stage map is averaged over a ``p x p`` neighbourhood (stride 1, zero padding, so the
    resolution is kept), the deeper maps are bilinearly upsampled to the first (shallowest) map,
    all are concatenated along channels and the channel vector of every position is reduced to
    ``target_dim`` values by 1-D adaptive average pooling.
    """
    if not maps:
        raise ValueError("aggregate_patches needs at least one feature map")
    pooled = [local_average(m.float(), int(neighbourhood)) for m in maps]
    f = torch.cat(to_common_grid(pooled, pooled[0].shape[-2:]), dim=1)  # B, sum C_i, h, w
    B, C, h, w = f.shape
    f = f.permute(0, 2, 3, 1).reshape(B * h * w, 1, C)  # B, C, h, w -> B*h*w, 1, C
    f = F.adaptive_avg_pool1d(f, target_dim)  # B*h*w, 1, D
    return f.reshape(B, h, w, target_dim).permute(0, 3, 1, 2).contiguous()  # B, D, h, w


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w) -> (B*h*w, D)``; a 2-D ``(N, D)`` input is returned unchanged."""
    if features.ndim == 2:
        return features
    if features.ndim != 4:
        raise ValueError(f"expected patch features (B, D, h, w) or (N, D), got {tuple(features.shape)}")
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def random_projection(features: torch.Tensor, dim: int, seed: int = 0, chunk_size: int = 8192,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection ``(N, D) -> (N, dim)`` scaled by ``1/sqrt(dim)``.

    ``dim <= 0`` or ``dim >= D`` returns the features (moved to ``device``) unprojected.
    """
    device = torch.device(device) if device is not None else features.device
    D = features.shape[1]
    if dim <= 0 or dim >= D:
        return features.to(device, torch.float32)
    g = torch.Generator().manual_seed(int(seed))
    R = (torch.randn(D, dim, generator=g) / math.sqrt(dim)).to(device)
    out = torch.empty(features.shape[0], dim, device=device)
    for s in range(0, features.shape[0], chunk_size):
        out[s : s + chunk_size] = features[s : s + chunk_size].to(device, torch.float32) @ R
    return out


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    chunk_size: int = 8192,
    device: torch.device | str | None = None,
    pruned: bool | None = None,
) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore Algorithm 1): indices of ``n_select`` rows of ``features``.

    Starting from one seeded random point, repeatedly add the point whose distance to its nearest
    already-selected point is largest (``argmax_m min_n ||psi(m) - psi(n)||``), on the projection
    ``psi`` of :func:`random_projection`.

    Two implementations, the same selection: on a GPU (``pruned=None`` picks by device) every
    step updates all ``N`` running minima with one matrix-vector product and the indices stay on
    the device (:func:`_greedy_dense`, no host synchronisation); on a CPU, where that product
    reads the whole projection from memory at every step, :func:`_greedy_lazy` skips, by the
    triangle inequality, every point whose nearest centre is too far from the new centre for the
    new centre to be nearer, and computes the others with the same formula.
    """
    N = features.shape[0]
    if N == 0:
        raise ValueError("greedy_coreset: no features")
    n_select = int(max(1, min(n_select, N)))
    z = random_projection(features, projection_dim, seed, chunk_size, device)  # N, d
    g = torch.Generator().manual_seed(int(seed) + 1)
    start = int(torch.randint(N, (1,), generator=g))
    if pruned is None:
        pruned = z.device.type == "cpu"
    return (_greedy_lazy if pruned else _greedy_dense)(z, n_select, start)


def _greedy_dense(z: torch.Tensor, n_select: int, start: int) -> torch.Tensor:
    """All ``N`` squared distances to each new centre (``|z|^2 - 2 z.c + |c|^2``) per step."""
    sq = (z * z).sum(dim=1)  # N
    selected = torch.empty(n_select, dtype=torch.long, device=z.device)
    selected[0] = start
    min_d = (sq - 2.0 * (z @ z[start]) + sq[start]).clamp_min_(0.0)  # N
    min_d[start] = 0.0
    for i in range(1, n_select):
        idx = torch.argmax(min_d).view(1)  # stays on the device (no .item(), no sync)
        selected[i : i + 1] = idx
        c = z.index_select(0, idx)[0]  # d
        d = (sq - 2.0 * (z @ c) + sq.index_select(0, idx)).clamp_min_(0.0)  # N
        min_d = torch.minimum(min_d, d)
    return selected


#: points per block of the lazy selection (blocks are clusters of the projection, split to this)
_LAZY_BLOCK = 512
#: squared-distance slack of a skip, as a share of the largest squared norm: far above the
#: float32 rounding of ``|z|^2 - 2 z.c + |c|^2`` (a few 1e-7 of it), so a skip is always exact
_SKIP_SLACK = 1e-5


def _blocks_by_cluster(z: torch.Tensor, block: int, iters: int = 4) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A permutation of the rows grouping near points (a few seeded k-means steps, only to group
    them), and the ``(start, end)`` of blocks of at most ``block`` rows in that order."""
    N = z.shape[0]
    k = max(1, N // block)
    g = torch.Generator().manual_seed(0)
    means = z[torch.randperm(N, generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(z, means).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).clamp_min_(1).to(z.dtype)
        means = torch.zeros_like(means).index_add_(0, assign, z) / counts[:, None]
    assign = torch.cdist(z, means).argmin(dim=1)
    perm = torch.argsort(assign, stable=True)
    bounds, lo = [], 0
    for count in torch.bincount(assign, minlength=k).tolist():
        for s in range(lo, lo + count, block):
            bounds.append((s, min(lo + count, s + block)))
        lo += count
    return perm, bounds


def _greedy_lazy(z: torch.Tensor, n_select: int, start: int, block: int = _LAZY_BLOCK) -> torch.Tensor:
    """The selection of :func:`_greedy_dense`, with the distance updates deferred and skipped.

    The points are grouped into blocks of near points (:func:`_blocks_by_cluster`); each block
    keeps how many centres were applied to it, the largest running minimum it then held (an upper
    bound of its current one: more centres only lower the minima), its mean and its radius. At
    each step the block with the highest bound is brought up to date until the highest bound is
    an up-to-date block's: that block holds the global maximum. Bringing a block up to date
    applies its pending centres with the dense path's own arithmetic (``|z|^2 - 2 z.c + |c|^2``
    row for row, so the minima are bit-identical), except the centres that cannot win any of its
    points: a centre farther from the block's mean than the block's radius plus the root of its
    largest minimum (triangle inequality, with a slack far above float rounding). Ties go to the
    first index, as ``argmax`` does in the dense path.
    """
    N, dim = z.shape
    sq = (z * z).sum(dim=1)
    slack = _SKIP_SLACK * float(sq.max())
    min_full = (sq - 2.0 * (z @ z[start]) + sq[start]).clamp_min_(0.0)  # the dense path's first step
    min_full[start] = 0.0
    perm, bounds = _blocks_by_cluster(z, block)
    zp, sqp, min_d = z[perm].contiguous(), sq[perm].contiguous(), min_full[perm].contiguous()
    nb = len(bounds)
    means = torch.stack([zp[lo:hi].double().mean(dim=0) for lo, hi in bounds])
    radius = torch.tensor([float((zp[lo:hi].double() - means[b]).norm(dim=1).max()) for b, (lo, hi) in enumerate(bounds)],
                          dtype=torch.float64) * (1 + 1e-6)
    bound = torch.stack([min_d[lo:hi].max() for lo, hi in bounds])
    applied = [1] * nb
    selected = torch.empty(n_select, dtype=torch.long)
    centres = torch.empty(n_select, dim, dtype=z.dtype)
    centre_sq = torch.empty(n_select, dtype=z.dtype)
    selected[0], centres[0], centre_sq[0] = start, z[start], sq[start]
    scratch = torch.empty(max(hi - lo for lo, hi in bounds), dtype=z.dtype)

    def refresh(b: int, i: int) -> None:
        lo, hi = bounds[b]
        done = applied[b]
        if done < i:
            m = min_d[lo:hi]
            top = float(m.max())
            far = ((centres[done:i].double() - means[b]).norm(dim=1) - radius[b]).clamp_min_(0.0) ** 2
            rows, buf = zp[lo:hi], scratch[: hi - lo]
            for j in (torch.nonzero(far <= top + slack).squeeze(1) + done).tolist():
                torch.addmv(sqp[lo:hi], rows, centres[j], alpha=-2.0, out=buf)  # |z|^2 - 2 z.c (2 z.c is exact)
                buf.add_(centre_sq[j])
                torch.minimum(m, buf, out=m)
            m.clamp_min_(0.0)  # min(m, max(d, 0), ...) == max(min(m, d, ...), 0) for m >= 0
            applied[b] = i
        bound[b] = min_d[lo:hi].max()

    for i in range(1, n_select):
        while True:
            b = int(torch.argmax(bound))
            if applied[b] == i:
                break
            refresh(b, i)
        top = bound[b]
        tied = torch.nonzero(bound == top).squeeze(1).tolist()
        best = N
        for t in tied:  # exact ties (duplicate points): the first original index, as the dense argmax
            refresh(t, i)
            if bool(bound[t] == top):
                lo, hi = bounds[t]
                best = min(best, int(perm[lo:hi][min_d[lo:hi] == top].min()))
        selected[i] = best
        centres[i] = z[best]
        centre_sq[i] = sq[best]
    return selected


def nearest_neighbors(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k-NN of each query row in ``bank``: ``(Q, D), (M, D) -> dist (Q, k), idx (Q, k)``.

    Queries and bank are both processed in chunks of ``chunk_size`` rows (``torch.cdist`` per
    block, running top-k merge), so memory stays ``O(chunk^2)``.
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty: fit the method first")
    k = min(int(k), bank.shape[0])
    query = query.float()
    bank = bank.to(query.device, torch.float32)
    dists, idxs = [], []
    for qs in range(0, query.shape[0], chunk_size):
        q = query[qs : qs + chunk_size]
        best_d = torch.full((q.shape[0], k), float("inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], k), dtype=torch.long, device=q.device)
        for ms in range(0, bank.shape[0], chunk_size):
            d = torch.cdist(q, bank[ms : ms + chunk_size])  # q, m
            kk = min(k, d.shape[1])
            dv, di = d.topk(kk, dim=1, largest=False)
            cat_d = torch.cat([best_d, dv], dim=1)
            cat_i = torch.cat([best_i, di + ms], dim=1)
            best_d, order = cat_d.topk(k, dim=1, largest=False)
            best_i = cat_i.gather(1, order)
        dists.append(best_d)
        idxs.append(best_i)
    return torch.cat(dists), torch.cat(idxs)


def reweighted_image_score(
    patch_feats: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor, bank: torch.Tensor, b: int = 9
) -> torch.Tensor:
    """Image score with the re-weighting of eq. 7.

    For each image take the test patch ``m_test*`` with the largest score ``s*`` and its nearest
    bank feature ``m*``; with ``N_b(m*)`` the ``b`` nearest bank features of ``m*`` (``m*``
    included), ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*``
    (computed as ``1 - softmax``, numerically stable).

    ``patch_feats``: (B, P, D); ``patch_scores``: (B, P); ``nn_index``: (B, P) bank index of each
    patch's nearest neighbour; ``bank``: (M, D). Returns (B,).
    """
    B = patch_scores.shape[0]
    s_star, arg = patch_scores.max(dim=1)  # B
    rows = torch.arange(B, device=patch_scores.device)
    m_test = patch_feats[rows, arg].float()  # B, D
    m_star_idx = nn_index[rows, arg]  # B
    bank = bank.to(m_test.device, torch.float32)
    _, support = nearest_neighbors(bank[m_star_idx], bank, k=b)  # B, b (m* itself, or an exact duplicate, first)
    d = torch.linalg.vector_norm(bank[support] - m_test[:, None], dim=-1)  # B, b
    d_star = torch.linalg.vector_norm(bank[m_star_idx] - m_test, dim=-1)  # B
    w_star = torch.exp(d_star - torch.logsumexp(d, dim=1))  # exp(d*) / sum exp(d), stable
    return (1.0 - w_star) * s_star


def _symmetric_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (scipy.ndimage 'reflect': d c b a | a b c d | d c b a)."""
    n = x.shape[dim]
    if pad <= 0:
        return x
    if pad > n:
        raise ValueError(f"cannot pad {pad} on a dimension of size {n}")
    head = x.narrow(dim, 0, pad).flip(dim)
    tail = x.narrow(dim, n - pad, pad).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def smooth_maps(patch_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """``(B, h, w)`` patch scores -> ``(B, H, W)``: bilinear upsampling, then a Gaussian of ``sigma``
    (taps ``2 * int(4 sigma + 0.5) + 1``, symmetric borders as scipy's ``gaussian_filter``)."""
    if isinstance(size, int):
        size = (size, size)
    x = F.interpolate(patch_scores[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        k = torch.exp(-(t**2) / (2.0 * sigma**2))
        k = k / k.sum()
        x = F.conv2d(_symmetric_pad(x, radius, 3), k.view(1, 1, 1, -1))  # along W
        x = F.conv2d(_symmetric_pad(x, radius, 2), k.view(1, 1, -1, 1))  # along H
    return x[:, 0]
