"""Exact mean silhouette (sklearn semantics), batched over problems that share images."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_bool_mask, check_floating, check_int, check_integer_tensor, check_shape

__all__ = ["silhouette_samples", "silhouette_score", "silhouette_problems", "mean_silhouette"]


def silhouette_samples(
    x: Tensor,
    labels: Tensor,
    n_clusters: int | None = None,
    point_mask: Tensor | None = None,
    *,
    max_block_elements: int = 2**25,
) -> Tensor:
    """Exact per-point silhouette (Euclidean), batched over problems, chunked over rows.

    sklearn's semantics: ``a(i)`` mean distance to the other members of its cluster,
    ``b(i)`` the smallest mean distance to another cluster, ``s(i) = (b − a) / max(a, b)``,
    ``s(i) = 0`` for members of singleton clusters (and where ``a = b = 0``).

    Args:
        x: ``(P, N, d)`` points.
        labels: ``(P, N)`` int64 in ``[0, C)`` (``-1`` on padded points).
        n_clusters: ``C`` (default ``labels.max() + 1``).
        point_mask: ``(P, N)`` boolean.
        max_block_elements: bound on the elements of each distance block ``(P, N, rows)``
            held at once, which bounds memory at ``O(max_block_elements)``.

    Returns:
        ``(P, N)`` silhouettes (0 on padded points).
    """
    dims = check_shape(x, "P N d", "x")
    check_floating("x", x)
    check_shape(labels, "P N", "labels", sizes=dims)
    P, N, d = x.shape
    dev = x.device
    labels = check_integer_tensor("labels", labels, (P, N), dev)
    point_mask = check_bool_mask("point_mask", labels >= 0 if point_mask is None else point_mask, (P, N), dev)
    if bool((labels[point_mask] < 0).any()):
        raise ValueError("labels must be >= 0 on every real point (point_mask)")
    if n_clusters is None:
        C = int(labels.max()) + 1 if labels.numel() else 1
    else:
        C = check_int("n_clusters", n_clusters, 1)
    if labels.numel() and int(labels.max()) >= C:
        raise ValueError(f"labels must lie in [0, n_clusters) = [0, {C}), got max {int(labels.max())}")
    if P == 0 or N == 0:
        return x.new_zeros(P, N)
    x = x * point_mask.to(x.dtype).unsqueeze(-1)
    dims = torch.full((P,), d, dtype=torch.long, device=dev)
    return silhouette_problems(x, point_mask, torch.arange(P, device=dev), dims, labels, max(C, 1), max_block_elements)


def silhouette_problems(xi: Tensor, pmask: Tensor, img: Tensor, dims: Tensor, labels: Tensor, C: int,
                       max_block_elements: int) -> Tensor:
    """Per-point silhouettes of problems that live on shared images.

    Problem ``p`` has labels ``labels[p] (N,)`` for the points of image ``img[p]`` of ``xi (B, N, D)``
    (zero on padded points), in its first ``dims[p]`` coordinates. The squared distances of an
    image are accumulated coordinate by coordinate from exact differences (``(u_i − u_j)²``, no
    cancellation, an exactly zero diagonal), and each problem is evaluated when its number of
    coordinates is reached, so every K of an image's band shares one distance accumulation. The
    per-cluster distance sums use the symmetry of the distance block: an ``index_add`` over its
    rows instead of a GEMM with one-hot labels. Blocks are ``(images, N, rows)``, with at most
    ``max_block_elements`` elements.

    Returns:
        ``(P, N)`` silhouettes (0 on padded points).
    """
    B, N, D = xi.shape
    P = img.numel()
    dev, dt = xi.device, xi.dtype
    out = torch.zeros(P, N, dtype=dt, device=dev)
    pm_p = pmask[img] & (labels >= 0)
    lab = labels.clamp_min(0)
    counts = torch.zeros(P, C, dtype=dt, device=dev).scatter_add_(1, lab, pm_p.to(dt))
    fm = pmask.to(dt).unsqueeze(-1)
    # centring changes no distance and keeps the coordinates small
    xc = (xi - (xi * fm).sum(1, keepdim=True) / fm.sum(1, keepdim=True).clamp_min(1)) * fm  # (B, N, D)
    steps = sorted(set(dims.tolist()))
    R = max(1, min(N, max_block_elements // N))  # rows per block
    nb = max(1, min(B, max_block_elements // (N * R)))  # images per block
    ar_p = torch.arange(P, device=dev)
    for b0 in range(0, B, nb):  # memory-bounding blocks, not a per-image loop
        b1 = min(B, b0 + nb)
        in_chunk = (img >= b0) & (img < b1)
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            d2 = torch.zeros(b1 - b0, N, r1 - r0, dtype=dt, device=dev)
            diff = torch.empty_like(d2)  # work buffer: coordinate differences, then distances
            prev = 0
            for K in steps:
                _accumulate_d2(d2, diff, xc[b0:b1], prev, K, r0, r1)
                prev = K
                sel = ar_p[in_chunk & (dims == K)]
                if sel.numel() == 0:
                    continue
                out[sel, r0:r1] = _silhouette_block(d2, diff, img[sel] - b0, lab[sel], counts[sel], pm_p[sel], C,
                                                    r0, r1)
    return out


def _accumulate_d2(d2: Tensor, diff: Tensor, xc: Tensor, j0: int, j1: int, r0: int, r1: int) -> None:
    """``d2 (b, N, R) += `` squared distances over coordinates ``j0 .. j1 − 1`` between all points
    and the points ``r0 .. r1 − 1`` (exact differences, one coordinate at a time for few
    coordinates; a GEMM for many, with the diagonal reset to 0)."""
    if j1 - j0 <= 8:
        for j in range(j0, j1):
            u = xc[:, :, j].contiguous()  # a strided coordinate makes the broadcast 10x slower
            torch.sub(u.unsqueeze(2), u[:, r0:r1].unsqueeze(1), out=diff)
            d2.addcmul_(diff, diff)
        return
    part = torch.cdist(xc[:, :, j0:j1], xc[:, r0:r1, j0:j1], compute_mode="use_mm_for_euclid_dist")
    d2.addcmul_(part, part)
    ar = torch.arange(r0, r1, device=d2.device)
    d2[:, ar, ar - r0] = d2[:, ar, ar - r0] - part[:, ar, ar - r0] ** 2


def _silhouette_block(d2: Tensor, buf: Tensor, bsel: Tensor, lab: Tensor, counts: Tensor, pm: Tensor, C: int,
                      r0: int, r1: int) -> Tensor:
    """Silhouettes of points ``r0 .. r1 − 1`` for problems on images ``bsel`` of the block ``d2``
    (``buf``: a work buffer shaped like ``d2``, reused to avoid a fresh large allocation)."""
    np_, N = lab.shape
    R = r1 - r0
    if np_ <= d2.shape[0]:
        dist = torch.index_select(d2, 0, bsel, out=buf[:np_]).sqrt_()  # (np, N, R)
    else:
        dist = d2.index_select(0, bsel).sqrt_()
    # per-cluster sums over all points j of dist(j, r): rows of the block added by label
    # padded points go to an extra dump cluster C
    idx = (torch.where(pm, lab, C) + (C + 1) * torch.arange(np_, device=lab.device).view(np_, 1)).view(-1)
    sums = torch.zeros(np_ * (C + 1), R, dtype=d2.dtype, device=d2.device).index_add_(0, idx, dist.view(np_ * N, R))
    sums = sums.view(np_, C + 1, R)[:, :C]
    own = lab[:, r0:r1]  # (np, R)
    own_cnt = counts.gather(1, own)
    a = sums.gather(1, own.unsqueeze(1)).squeeze(1) / (own_cnt - 1).clamp_min(1)
    mean_other = sums / counts.clamp_min(1).unsqueeze(-1)
    excl = (counts.unsqueeze(-1) == 0) | (torch.arange(C, device=lab.device).view(1, C, 1) == own.unsqueeze(1))
    b = mean_other.masked_fill(excl, float("inf")).amin(1)
    den = torch.maximum(a, b)
    s = torch.where(den > 0, (b - a) / den.clamp_min(1e-300), torch.zeros_like(a))
    s = torch.where(torch.isfinite(b) & (own_cnt > 1), s, torch.zeros_like(s))
    return s * pm[:, r0:r1].to(s.dtype)


def silhouette_score(
    x: Tensor,
    labels: Tensor,
    n_clusters: int | None = None,
    point_mask: Tensor | None = None,
    *,
    max_block_elements: int = 2**25,
) -> Tensor:
    """Mean silhouette per problem (sklearn's ``silhouette_score`` semantics).

    Args:
        x: ``(P, N, d)`` points; labels ``(P, N)``; point_mask ``(P, N)``.

    Returns:
        ``(P,)`` mean silhouette over the real points; NaN where fewer than two clusters
        are present (sklearn raises there).

    Example:
        >>> x = torch.tensor([[[0.0], [0.1], [5.0], [5.2]]])
        >>> round(float(silhouette_score(x, torch.tensor([[0, 0, 1, 1]]))), 4)
        0.9703
    """
    if point_mask is None:
        point_mask = labels >= 0
    s = silhouette_samples(x, labels, n_clusters, point_mask, max_block_elements=max_block_elements)
    C = int(labels.max()) + 1 if n_clusters is None else int(n_clusters)
    return mean_silhouette(s, labels, C, point_mask)


def mean_silhouette(s: Tensor, labels: Tensor, C: int, point_mask: Tensor) -> Tensor:
    """Mean of per-point silhouettes ``s (P, N)``; NaN with fewer than 2 or with n clusters."""
    n = point_mask.sum(-1).clamp_min(1)
    score = s.sum(-1) / n.to(s.dtype)
    # count members per cluster (scatter_add: padded points, clamped to label 0, add nothing;
    # a plain scatter_ of the mask would let them overwrite cluster 0's flag)
    counts = torch.zeros(labels.shape[0], max(C, 1), dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels.clamp_min(0), point_mask.long())
    n_present = (counts > 0).sum(-1)
    return torch.where((n_present >= 2) & (n_present < point_mask.sum(-1)), score, torch.full_like(score, float("nan")))
