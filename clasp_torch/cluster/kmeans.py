"""Batched Lloyd k-means (sklearn semantics) over many (image, K) problems at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_bool_mask, check_finite, check_floating, check_int, check_shape
from . import policy as _policy
from .kmeanspp import kmeanspp
from .layout import TIE_RTOL, KGroups, ScoreBuffers

__all__ = ["KMeansResult", "kmeans", "kmeans_problems", "canonical_labels", "check_kmeans_settings", "relocate_empty"]


@dataclass
class KMeansResult:
    """Result of a batch of k-means problems.

    Attributes:
        labels: ``(P, N)`` int64 cluster of each point (``-1`` on padded points).
        centers: ``(P, C, d)`` centres (rows ``>= K_p`` are zero).
        inertia: ``(P,)`` sum of squared distances to the closest centre (best restart).
        n_iter: number of Lloyd iterations run (max over problems).
    """

    labels: Tensor
    centers: Tensor
    inertia: Tensor
    n_iter: int


def kmeans(
    x: Tensor,
    k: Tensor,
    point_mask: Tensor | None = None,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    check_every: int = 1,
) -> KMeansResult:
    """Batched Lloyd k-means with greedy k-means++ init and empty-cluster relocation.

    Args:
        x: ``(P, N, d)`` points of ``P`` independent problems (padded).
        k: ``(P,)`` number of clusters per problem (``1 <= k_p <= n_p``).
        point_mask: ``(P, N)`` boolean, True on real points (real points first).
        n_init: restarts, run as a batch dimension; the lowest inertia wins.
        max_iter: maximum Lloyd iterations.
        tol: convergence when the squared centre shift of a restart is at most ``tol`` times
            the mean per-coordinate variance of its problem (sklearn's rule).
        seed: seed of the counter-based random numbers.
        check_every: convergence is checked every this many iterations (fewer host syncs).

    Returns:
        :class:`KMeansResult`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pts = torch.cat([torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g) + 10])
        >>> r = kmeans(pts[None], torch.tensor([2]))
        >>> r.labels[0, :20].unique().numel(), r.labels[0, 20:].unique().numel()
        (1, 1)
    """
    check_shape(x, "P N d", "x")
    check_floating("x", x)
    P, N, d = x.shape
    dev = x.device
    point_mask = check_bool_mask("point_mask", point_mask, (P, N), dev)
    k = _check_k(k, P, dev)
    n_init, max_iter, check_every, seed, tol = check_kmeans_settings(n_init, max_iter, check_every, seed, tol)
    n = point_mask.sum(-1)
    if bool((k < 1).any()) or bool((k > n).any()):
        raise ValueError("k must satisfy 1 <= k <= number of points for every problem")
    check_finite("x", x[point_mask])
    if P == 0:
        return KMeansResult(labels=torch.full((0, N), -1, dtype=torch.long, device=dev),
                            centers=x.new_zeros(0, 0, d), inertia=x.new_zeros(0), n_iter=0)
    x = x * point_mask.to(x.dtype).unsqueeze(-1)
    # trailing all-zero coordinates change no distance: compute in the used ones only, but keep
    # sklearn's tolerance, a mean variance over all d coordinates
    used = (x != 0).any(1)  # (P, d)
    dims = (used.long() * torch.arange(1, d + 1, device=dev)).amax(-1).clamp_min(1)
    tol_p = tol * dims.double() / d
    return kmeans_problems(x, point_mask, torch.arange(P, device=dev), dims, k, n_init, max_iter, tol_p, seed,
                           check_every)


def _check_k(k: Tensor, P: int, dev: torch.device) -> Tensor:
    """``k`` as ``(P,)`` int64 (any shape with ``P`` entries is accepted)."""
    k = torch.as_tensor(k, device=dev)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise ValueError(f"k must hold integers, got dtype {k.dtype}")
    k = k.long().view(-1)
    if k.shape[0] != P:
        raise ValueError(f"k must have one entry per problem ({P}), got {k.shape[0]}")
    return k


def check_kmeans_settings(n_init: int, max_iter: int, check_every: int, seed: int,
                          tol: float) -> tuple[int, int, int, int, float]:
    """The k-means settings validated: ``(n_init, max_iter, check_every, seed, tol)``."""
    n_init = check_int("n_init", n_init, 1)
    max_iter = check_int("max_iter", max_iter, 1)
    check_every = check_int("check_every", check_every, 1)
    seed = check_int("seed", seed)
    if not float(tol) >= 0.0:  # also rejects NaN
        raise ValueError(f"tol must be >= 0, got {tol}")
    return n_init, max_iter, check_every, seed, float(tol)


def kmeans_problems(xi: Tensor, pmask: Tensor, img: Tensor, dims: Tensor, k: Tensor, n_init: int, max_iter: int,
                    tol: float | Tensor, seed: int, check_every: int,
                    compact_below: float | None = None, max_groups: int | None = None) -> KMeansResult:
    """k-means problems that live on shared images (validated inputs).

    Problem ``p`` clusters the real points of image ``img[p]`` of ``xi (B, N, D)`` (zero on
    padded points), in its first ``dims[p]`` coordinates, into ``k[p]`` clusters; ``n_init``
    restarts each; ``tol`` (a float or one per problem) times the mean variance of those
    coordinates bounds the squared centre shift at convergence. Restart ``q = p * n_init + i``.
    Every Lloyd step computes the scores of all active restarts of an image in one GEMM (no
    per-restart copy of the points), and moves only the points that changed cluster between
    float64 cluster sums.

    Converged restarts are frozen (their centres recorded) and dropped from the working arrays
    once the live ones are at most ``compact_below`` of them (``1.0``: at once); until then they
    ride along, which saves the compaction's operator launches and host syncs. Frozen restarts
    never affect live ones. ``max_groups`` caps the K groups scored separately (see
    :class:`KGroups`). Neither changes the result; ``None`` takes the value of
    :func:`~clasp_torch.cluster.policy.cluster_policy` for the device.
    """
    B, N, D = xi.shape
    P = img.numel()
    dev, dt = xi.device, xi.dtype
    C = int(k.max())
    n = pmask.sum(-1)[img]  # (P,)
    colmask = torch.arange(D, device=dev).view(1, D) < dims.view(P, 1)  # (P, D)
    # squared norm of every point in its problem's coordinates
    cum2 = (xi * xi).cumsum(-1)  # (B, N, D)
    x2 = cum2[img].gather(2, (dims - 1).view(P, 1, 1).expand(P, N, 1)).squeeze(2)  # (P, N)
    tol_p = _problem_tolerances(xi, pmask, img, dims, colmask, tol)
    centres = kmeanspp(xi, x2, pmask, img, colmask, n, k, n_init, seed).reshape(P * n_init, C, D)
    restarts = _Restarts(img.repeat_interleave(n_init), k.repeat_interleave(n_init), dims.repeat_interleave(n_init))
    # tie tolerance of each point: rounding of ||x||² + ||c||² (the full-D ||x||² >= each problem's)
    tie = (TIE_RTOL[dt] * cum2[..., -1]).unsqueeze(1), torch.tensor(TIE_RTOL[dt], dtype=dt, device=dev)
    pol = _policy.cluster_policy(dev)
    compact_below = pol.compact_below if compact_below is None else compact_below
    max_groups = pol.max_groups if max_groups is None else max_groups
    bufs = ScoreBuffers()
    it = _lloyd(centres, xi, pmask, restarts, colmask.repeat_interleave(n_init, dim=0), tol_p.repeat_interleave(n_init),
                tie, bufs, max_iter, check_every, compact_below, max_groups)
    # final assignment with the final centres of every restart (in K order, then back)
    q_order = restarts.order
    lab_s, mind_s = KGroups(restarts.k[q_order], restarts.dims[q_order], restarts.img[q_order], B, N,
                            max_groups).nearest(centres[q_order], xi.transpose(1, 2), tie, bufs, with_min=True)
    lab = torch.empty_like(lab_s).index_copy_(0, q_order, lab_s).long()
    mind = torch.empty_like(mind_s).index_copy_(0, q_order, mind_s)
    inertia = ((mind + x2.repeat_interleave(n_init, dim=0)).clamp_min(0) * pmask[restarts.img].to(dt)).sum(-1)
    inertia = inertia.view(P, n_init)
    # lowest restart index among (numerically) equal inertias, so float noise never decides
    near = inertia <= inertia.min(-1, keepdim=True).values * (1 + TIE_RTOL[dt]) + 1e-300
    best = near.to(torch.int8).argmax(-1)
    qb = torch.arange(P, device=dev) * n_init + best
    labels_b, perm = canonical_labels(lab[qb], C, pmask[img])
    centers = centres[qb].gather(1, perm.unsqueeze(-1).expand(P, C, D))
    return KMeansResult(labels=labels_b, centers=centers, inertia=inertia.gather(1, best.view(P, 1)).squeeze(1),
                        n_iter=it)


def _problem_tolerances(xi: Tensor, pmask: Tensor, img: Tensor, dims: Tensor, colmask: Tensor,
                        tol: float | Tensor) -> Tensor:
    """sklearn's convergence bound of each problem ``(P,)``: ``tol`` times the mean variance of the
    problem's coordinates (float64: the first eigenvector's large mean would cancel in float32)."""
    B = xi.shape[0]
    acc = torch.float64
    pm = pmask.to(acc).unsqueeze(-1)
    s1 = (xi.to(acc) * pm).sum(1)  # (B, D)
    s2 = (xi.to(acc) ** 2 * pm).sum(1)
    nb = pmask.sum(-1).clamp_min(1).to(acc).view(B, 1)
    var = (s2 / nb - (s1 / nb) ** 2).clamp_min(0)  # (B, D)
    tol_t = torch.as_tensor(tol, dtype=acc, device=xi.device)
    return (tol_t * (var[img] * colmask.to(acc)).sum(-1) / dims.to(acc)).to(xi.dtype)


@dataclass
class _Restarts:
    """Image, K and coordinates of every restart ``(Q,)``, and the restarts in K order (groups of
    similar K are then contiguous slices, see :class:`KGroups`)."""

    img: Tensor
    k: Tensor
    dims: Tensor

    def __post_init__(self) -> None:
        self.order = torch.sort(self.k, stable=True).indices


def _lloyd(centres: Tensor, xi: Tensor, pmask: Tensor, restarts: _Restarts, colmask: Tensor, tol: Tensor,
           tie: tuple[Tensor, Tensor], bufs: ScoreBuffers, max_iter: int, check_every: int, compact_below: float,
           max_groups: int) -> int:
    """Lloyd iterations of every restart; ``centres (Q, C, D)`` are updated in place with each
    restart's final centres. ``colmask (Q, D)`` and ``tol (Q,)`` are per restart. Returns the
    number of iterations run."""
    B, N, D = xi.shape
    Q, C, _ = centres.shape
    dev, dt, acc = xi.device, xi.dtype, torch.float64
    xT = xi.transpose(1, 2)
    # float64 rows with a trailing 1: one index_add moves a point's coordinates and count
    rows1 = torch.cat([xi.reshape(B * N, D).to(acc), torch.ones(B * N, 1, dtype=acc, device=dev)], 1)
    ar_c = torch.arange(C, device=dev)
    # state of the active (not yet converged) restarts, kept compact: gathered only when the
    # active set shrinks
    qa = restarts.order
    img_a, k_a, dims_a = restarts.img[qa], restarts.k[qa], restarts.dims[qa]
    pm_a = pmask[img_a]  # (A, N)
    col_a = colmask[qa].to(dt).unsqueeze(1)  # (A, 1, D)
    tol_a = tol[qa]
    cen_a = centres[qa]
    lab_a = torch.full((Q, N), -1.0, dtype=dt, device=dev)  # nearest centre, as float
    sums_a = torch.zeros(Q, C, D + 1, dtype=acc, device=dev)  # float64 cluster sums, then counts
    groups = None
    alive_a = torch.ones(Q, dtype=torch.bool, device=dev)
    n_alive = Q
    it = 0
    for it in range(1, max_iter + 1):
        if groups is None:
            groups = KGroups(k_a, dims_a, img_a, B, N, max_groups)
        new_lab = groups.nearest(cen_a, xT, tie, bufs)  # (A, N) float
        changed = pm_a if it == 1 else (new_lab != lab_a) & pm_a
        fi = changed.view(-1).nonzero().squeeze(1)
        ai = fi // N
        xc = rows1.index_select(0, img_a.index_select(0, ai) * N + fi % N)
        aic = ai * C
        sums_a.view(-1, D + 1).index_add_(0, aic + new_lab.view(-1).index_select(0, fi).long(), xc)
        if it > 1:
            sums_a.view(-1, D + 1).index_add_(0, aic + lab_a.view(-1).index_select(0, fi).long(), xc, alpha=-1)
        lab_a = new_lab
        cnt_a = sums_a[..., D]
        new = (sums_a[..., :D] / cnt_a.clamp_min(1).unsqueeze(-1)).to(dt) * col_a
        empty = (cnt_a == 0) & (ar_c.view(1, C) < k_a.view(-1, 1))
        if bool(empty.any()):
            new = relocate_empty(new, cen_a, empty, lab_a.long(), img_a, col_a, pm_a, xi, sums_a, rows1)
        shift = ((new - cen_a) ** 2).sum((-1, -2))  # (A,)
        cen_a = new
        if it % check_every == 0 or it == max_iter:
            still = (shift > tol_a) & alive_a
            n_still = int(still.sum())  # one host read answers "all?" and "any?"
            if n_still < n_alive:
                done = (alive_a & ~still).nonzero().squeeze(1)
                centres.index_copy_(0, qa.index_select(0, done), cen_a.index_select(0, done))
                if n_still == 0:
                    return it
                alive_a, n_alive = still, n_still
                if n_still <= compact_below * still.numel():
                    keep = still.nonzero().squeeze(1)  # one sync, then index_select: no per-tensor mask sync
                    qa, img_a, k_a, dims_a, pm_a, col_a, tol_a, cen_a, lab_a, sums_a, alive_a = (
                        t.index_select(0, keep)
                        for t in (qa, img_a, k_a, dims_a, pm_a, col_a, tol_a, cen_a, lab_a, sums_a, alive_a))
                    groups = None
    live = alive_a.nonzero().squeeze(1)
    centres.index_copy_(0, qa.index_select(0, live), cen_a.index_select(0, live))
    return it


def relocate_empty(new: Tensor, cen: Tensor, empty: Tensor, lab: Tensor, img: Tensor, col: Tensor, pm: Tensor,
                    xi: Tensor, sums: Tensor, rows1: Tensor) -> Tensor:
    """Move empty clusters to the points farthest from their current centre (sklearn's rule).

    As sklearn's ``_relocate_empty_clusters_dense``: the ``e``-th empty cluster takes the
    ``e``-th farthest point, and that point leaves its old cluster in the same step (the old
    centre becomes the mean of the points that remain).

    ``new``/``cen (A, C, D)``, ``empty (A, C)``, ``lab (A, N)``, ``img (A,)``, ``col (A, 1, D)``,
    ``pm (A, N)``, ``xi (B, N, D)``, ``sums (A, C, D + 1)`` float64 cluster sums and counts of
    ``lab``, ``rows1 (B * N, D + 1)`` the points with a trailing 1.
    """
    A, C, D = new.shape
    N = xi.shape[1]
    ae = empty.any(1).nonzero().squeeze(1)
    xe = xi[img[ae]] * col[ae]  # (E, N, D)
    ce = cen[ae].gather(1, lab[ae].clamp_min(0).unsqueeze(-1).expand(-1, N, D))
    dist = ((xe - ce) ** 2).sum(-1).masked_fill(~pm[ae], -1.0)
    far = dist.topk(min(C, N), dim=-1).indices  # (E, C)
    emp = empty[ae]
    rank = (emp.long().cumsum(-1) - 1).clamp_min(0)
    pick = far.gather(-1, rank)  # (E, C): the point each empty slot takes
    repl = xe.gather(1, pick.unsqueeze(-1).expand(-1, pick.shape[1], D))
    # the taken points leave their old clusters: subtract them from the old clusters' sums
    old = lab[ae].gather(1, pick)  # (E, C) old cluster of each taken point
    taken = rows1.index_select(0, (img[ae].unsqueeze(1) * N + pick).reshape(-1)).view(-1, C, D + 1)
    taken = taken * emp.unsqueeze(-1).to(taken.dtype)  # only the slots that really relocate
    delta = torch.zeros_like(sums[ae]).scatter_add_(1, old.unsqueeze(-1).expand(-1, C, D + 1), taken)
    rest = sums[ae] - delta
    moved = delta[..., D] > 0
    mean_rest = (rest[..., :D] / rest[..., D].clamp_min(1).unsqueeze(-1)).to(new.dtype) * col[ae]
    new = new.clone()
    upd = torch.where(moved.unsqueeze(-1), mean_rest, new[ae])
    new[ae] = torch.where(emp.unsqueeze(-1), repl, upd)
    return new


def canonical_labels(labels: Tensor, n_clusters: int, point_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber clusters in order of first appearance (by point index).

    Makes equal partitions give identical label maps whatever the restart or batch.

    Args:
        labels: ``(P, N)`` in ``[0, C)``; point_mask ``(P, N)``.

    Returns:
        ``(new_labels (P, N) with -1 on padding, perm (P, C))`` where ``perm[p, j]`` is the old id
        of new cluster ``j`` (empty clusters last).

    Example:
        >>> canonical_labels(torch.tensor([[2, 2, 0, 1]]), 3, torch.ones(1, 4, dtype=torch.bool))[0]
        tensor([[0, 0, 1, 2]])
    """
    P, N = labels.shape
    C = n_clusters
    pos = torch.arange(N, device=labels.device).expand(P, N)
    first = torch.full((P, C), N, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(1, labels.clamp_min(0), torch.where(point_mask, pos, N), reduce="amin")
    perm = torch.sort(first, dim=-1, stable=True).indices  # new id -> old id
    inv = perm.argsort(-1)  # old id -> new id
    new = inv.gather(1, labels.clamp_min(0)).masked_fill(~point_mask, -1)
    return new, perm
