"""Clustering stage of CLASP: batched k-means, exact mean silhouette, K selection.

All K of every image's band, all images and all k-means restarts run as one batch of
"problems". A problem ``p`` is one (image, K) pair; it clusters the ``n_b`` real patches of its
image in the space of the first ``K`` eigenvectors into ``K`` clusters. Problems are not copied:
they refer to their image's embedding ``(B, N, D)`` (a point mask marks the real patches) and to
their number of coordinates. Each Lloyd step scores all active restarts of an image with one
GEMM (centres beyond a restart's ``K`` are masked, coordinates beyond its ``K`` are zero) and
moves only the points that changed cluster between float64 cluster sums. The silhouettes of all
K of an image share one accumulation of squared distances, coordinate by coordinate.

Randomness comes from a counter-based hash of ``(seed, K, restart, centre, trial)``, and ties
within rounding go to the first index, so the result of an image depends only on the seed and
its own data: the same image gives the same labels alone or inside any batch, on any device.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .spectral import SpectralResult

__all__ = [
    "KMeansResult",
    "kmeans",
    "silhouette_score",
    "silhouette_samples",
    "ClusterSelection",
    "select_k",
    "best_in_band",
    "KBandClustering",
    "hash_uniform",
    "canonical_labels",
]

_MASK32 = 0xFFFFFFFF


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy/torch integer, not bool), else a ValueError naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _hash32(x: Tensor) -> Tensor:
    """Integer avalanche hash on the low 32 bits of an int64 tensor (multipliers < 2**31)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seed: int, *keys: Tensor) -> Tensor:
    """Counter-based uniform numbers in [0, 1) from integer keys (broadcast together).

    Deterministic on every device and independent of how problems are batched.

    Example:
        >>> u = hash_uniform(0, torch.arange(4))
        >>> bool(((u >= 0) & (u < 1)).all()), u.dtype
        (True, torch.float64)
    """
    h = torch.as_tensor(seed & _MASK32, dtype=torch.int64, device="cpu")
    h = _hash32(h + 0x9E3779B9)
    out = None
    for k in keys:
        base = h if out is None else out
        out = _hash32(base.to(k.device) ^ _hash32(k.long() + 0x632BE5AB))
    assert out is not None
    return out.double() / 4294967296.0


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


def _rank_in_group(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Position of every item inside its group (items keep their order) and the group sizes:
    ``(rank (A,), counts (n_groups,))``."""
    counts = torch.bincount(group, minlength=n_groups)
    order = torch.argsort(group, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return rank, counts


def _kmeanspp(xi: Tensor, x2: Tensor, pmask: Tensor, img: Tensor, colmask: Tensor, n: Tensor, k: Tensor,
              n_init: int, seed: int) -> Tensor:
    """Greedy k-means++ initialisation of every restart of every problem.

    Args:
        xi: ``(B, N, D)`` image embeddings (zero on padded points); x2 ``(P, N)`` squared norms
            in each problem's space; pmask ``(B, N)``; img ``(P,)`` image of each problem;
            colmask ``(P, D)`` the problem's coordinates; n ``(P,)`` points; k ``(P,)`` clusters.

    Returns:
        centres ``(P, I, C, D)`` (zero beyond each problem's coordinates and clusters).

    The distances of every candidate of all problems of an image come from one GEMM per image.
    """
    B, N, D = xi.shape
    C = int(k.max())
    dev, dt = xi.device, xi.dtype
    I = n_init
    # sklearn's 2 + log(K) local trials, per problem (trials_s below): with the batch's largest K
    # instead, an image's result would depend on the other images of its batch
    trials = 2 + int(math.log(max(C, 2)))
    # every per-problem tensor goes to padded slots grouped by image (S = B * M), where one GEMM
    # per image serves all its problems; padding slots have k = n = 1 and are dropped at the end.
    # Inside an image the problems are sorted by K descending, so the problems still adding a
    # centre at step c (K > c) are a prefix of every image's row: later steps skip the others.
    perm = torch.sort(-k, stable=True).indices
    perm = perm[torch.sort(img[perm], stable=True).indices]  # (image, -K) order
    img, k, n, colmask, x2 = img[perm], k[perm], n[perm], colmask[perm], x2[perm]
    layout = _Layout(img, B)
    rows = xi.reshape(B * N, D)
    xT = xi.transpose(1, 2)
    if layout.row_img is not None:  # some images have no problem: rows for the others only
        xT = xT.index_select(0, layout.row_img)
    B, M, slot = layout.rows, layout.M, layout.slot  # from here on, B counts GEMM rows
    S = B * M
    if layout.identity:
        img_s, k_s, n_s, col_s, x2_s = img, k, n, colmask, x2
    else:
        img_s = torch.arange(S, device=dev) // M
        if layout.row_img is not None:
            img_s = layout.row_img[img_s]
        k_s = _slots(k, slot, S).clamp_min(1)
        n_s = _slots(n, slot, S).clamp_min(1)
        col_s = _slots(colmask, slot, S)
        x2_s = _slots(x2, slot, S)
    # active prefix length of the rows at each step c = 1 .. C-1 (one host sync)
    prefix = (k_s.view(B, M, 1) > torch.arange(1, max(C, 2), device=dev).view(1, 1, -1)).sum(1).amax(0).tolist()
    trials_s = 2 + torch.log(k_s.clamp_min(2).double()).floor().long()  # (S,)
    ar_i = torch.arange(I, device=dev).view(1, I)
    kk = k_s.view(S, 1)
    zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
    base = (img_s * N).view(S, 1)
    colf = col_s.view(S, 1, D).to(dt)
    # first centre: uniform among the real points
    u0 = hash_uniform(seed, kk, ar_i, zero, zero)
    first = (u0 * n_s.view(S, 1).double()).long().clamp(max=N - 1)  # (S, I)
    pts = rows[base + first] * colf  # (S, I, D)
    centres = torch.zeros(S, I, C, D, dtype=dt, device=dev)
    centres[:, :, 0] = pts
    pm = pmask[img_s].to(dt).unsqueeze(1)  # (S, 1, N)
    # Distances live in "score space", d² − ||x||² = ||c||² − 2 x·c: one GEMM with the ||c||² bias
    # and no pass to add ||x||², which is constant over the candidates of a point (so it changes
    # no choice). Padded points have x = 0, hence score-space closest = 0 = their true distance.
    closest = torch.baddbmm((pts * pts).sum(-1, keepdim=True).expand(S, I, 1).reshape(B, M * I, 1),
                            pts.view(B, M * I, D), xT, alpha=-2).view(B, M, I, N) * pm.view(B, M, 1, N)
    x2b = x2_s.view(B, M, 1, N)
    ar_t = torch.arange(trials, device=dev).view(1, 1, 1, trials)
    cen_b = centres.view(B, M, I, C, D)
    # the draws of every step at once (one hash instead of one per step: fewer kernel launches);
    # u_all[..., c - 1, t] is the draw of centre c, trial t
    u_all = hash_uniform(seed, k_s.view(B, M, 1, 1, 1), ar_i.view(1, 1, I, 1, 1),
                         torch.arange(1, max(C, 2), device=dev).view(1, 1, 1, -1, 1), ar_t.view(1, 1, 1, 1, trials))
    for c in range(1, C):
        m = prefix[c - 1]  # the first m problems of every image still add a centre
        cl = closest[:, :m]  # (B, m, I, N), score space
        x2c = x2b[:, :m]
        dist = (cl + x2c).clamp_min_(0)  # true squared distances
        pot = dist.sum(-1, keepdim=True)  # (B, m, I, 1)
        kc = k_s.view(B, M)[:, :m]
        u = u_all[:, :m, :, c - 1]  # (B, m, I, trials)
        cum = dist.cumsum(-1)
        target = u.to(dt) * pot  # (B, m, I, T)
        cand = torch.searchsorted(cum, target).clamp(max=N - 1)
        cand = torch.minimum(cand, n_s.view(B, M)[:, :m].view(B, m, 1, 1) - 1)
        cpts = rows[base.view(B, M)[:, :m].view(B, m, 1, 1) + cand] * colf.view(B, M, 1, 1, D)[:, :m]  # (B, m, I, T, D)
        c2 = (cpts * cpts).sum(-1, keepdim=True)
        # squared distances (score space) of every point to every candidate: (B, m, I, T, N)
        cd = torch.baddbmm(c2.view(B, m * I * trials, 1), cpts.view(B, m * I * trials, D), xT,
                           alpha=-2).view(B, m, I, trials, N)
        newc = torch.minimum(cd, cl.unsqueeze(3), out=cd)
        # potential of each trial, up to the constant sum of ||x||² (padded points add 0)
        pot_t = newc.sum(-1).masked_fill(ar_t >= trials_s.view(B, M)[:, :m].view(B, m, 1, 1), float("inf"))
        # first trial within rounding of the best potential (ties never decided by rounding)
        near = pot_t <= pot_t.amin(-1, keepdim=True) + TIE_RTOL[dt] * (pot + x2c.sum(-1, keepdim=True))
        best = near.to(torch.int8).argmax(-1)  # (B, m, I)
        closest[:, :m] = newc.gather(3, best.view(B, m, I, 1, 1).expand(B, m, I, 1, N)).squeeze(3)
        chosen = cpts.gather(3, best.view(B, m, I, 1, 1).expand(B, m, I, 1, D)).squeeze(3)
        active = (kc > c).view(B, m, 1, 1).to(dt)
        cen_b[:, :m, :, c] = chosen * active
    centres = centres if layout.identity else centres[slot]
    return torch.empty_like(centres).index_copy_(0, perm, centres)


def _slots(t: Tensor, slot: Tensor, S: int) -> Tensor:
    """Scatter per-item rows ``t (A, ...)`` into ``S`` zero-initialised slots."""
    out = t.new_zeros((S,) + tuple(t.shape[1:]))
    out[slot] = t
    return out


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
    if x.dim() != 3:
        raise ValueError(f"x must have shape (P, N, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    P, N, d = x.shape
    dev = x.device
    if point_mask is None:
        point_mask = torch.ones(P, N, dtype=torch.bool, device=dev)
    if point_mask.shape != (P, N):
        raise ValueError(f"point_mask must have shape {(P, N)}, got {tuple(point_mask.shape)}")
    point_mask = point_mask.to(device=dev, dtype=torch.bool)
    k = _check_k(k, P, dev)
    n_init, max_iter, check_every, seed, tol = _check_settings(n_init, max_iter, check_every, seed, tol)
    n = point_mask.sum(-1)
    if bool((k < 1).any()) or bool((k > n).any()):
        raise ValueError("k must satisfy 1 <= k <= number of points for every problem")
    if not bool(torch.isfinite(x[point_mask]).all()):
        raise ValueError("x contains NaN or Inf values")
    if P == 0:
        return KMeansResult(labels=torch.full((0, N), -1, dtype=torch.long, device=dev),
                            centers=x.new_zeros(0, 0, d), inertia=x.new_zeros(0), n_iter=0)
    x = x * point_mask.to(x.dtype).unsqueeze(-1)
    # trailing all-zero coordinates change no distance: compute in the used ones only, but keep
    # sklearn's tolerance, a mean variance over all d coordinates
    used = (x != 0).any(1)  # (P, d)
    dims = (used.long() * torch.arange(1, d + 1, device=dev)).amax(-1).clamp_min(1)
    tol_p = tol * dims.double() / d
    return _kmeans_images(x, point_mask, torch.arange(P, device=dev), dims, k, n_init, max_iter, tol_p, seed, check_every)


def _check_k(k: Tensor, P: int, dev: torch.device) -> Tensor:
    k = torch.as_tensor(k, device=dev)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise ValueError(f"k must hold integers, got dtype {k.dtype}")
    k = k.long().view(-1)
    if k.shape[0] != P:
        raise ValueError(f"k must have one entry per problem ({P}), got {k.shape[0]}")
    return k


def _check_settings(n_init: int, max_iter: int, check_every: int, seed: int, tol: float) -> tuple[int, int, int, int, float]:
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    check_every = _check_int("check_every", check_every, 1)
    seed = _check_int("seed", seed)
    if not float(tol) >= 0.0:  # also rejects NaN
        raise ValueError(f"tol must be >= 0, got {tol}")
    return n_init, max_iter, check_every, seed, float(tol)


@dataclass(frozen=True)
class ClusterPolicy:
    """Device-dependent cost choices of the clustering stage; no result depends on them.

    Attributes:
        compact_below: converged k-means restarts leave the working arrays once the live ones
            are at most this fraction of them (1.0: at once).
        max_groups: K groups whose restarts are scored separately (see :class:`_KGroups`).
        max_block_elements: elements of one silhouette distance block.
    """

    compact_below: float
    max_groups: int
    max_block_elements: int


def cluster_policy(device: torch.device) -> ClusterPolicy:
    """The policy for ``device``: a CPU is bound by arithmetic (compact at once, 3 K groups, 2**25
    block elements); a GPU by operator launches and host syncs (compact when half are live, one
    K group, 2**27 block elements: a batch of 32 images of ~1500 patches in one block).
    ``benchmarks/launches.py`` counts both."""
    if device.type == "cpu":
        return ClusterPolicy(compact_below=1.0, max_groups=3, max_block_elements=2**25)
    return ClusterPolicy(compact_below=0.5, max_groups=1, max_block_elements=2**27)


def _kmeans_images(xi: Tensor, pmask: Tensor, img: Tensor, dims: Tensor, k: Tensor, n_init: int, max_iter: int,
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
    :class:`_KGroups`). Neither changes the result; ``None`` takes the value of
    :func:`cluster_policy` for the device.
    """
    B, N, D = xi.shape
    P = img.numel()
    dev, dt = xi.device, xi.dtype
    acc = torch.float64
    I = n_init
    C = int(k.max())
    Q = P * I
    pm_img = pmask.to(dt)
    n = pmask.sum(-1)[img]  # (P,)
    colmask = torch.arange(D, device=dev).view(1, D) < dims.view(P, 1)  # (P, D)
    # squared norm of every point in its problem's coordinates
    cum2 = (xi * xi).cumsum(-1)  # (B, N, D)
    x2 = cum2[img].gather(2, (dims - 1).view(P, 1, 1).expand(P, N, 1)).squeeze(2)  # (P, N)
    # sklearn: tol scaled by the mean variance of the problem's coordinates (float64: the first
    # eigenvector's large mean would cancel in float32)
    s1 = (xi.to(acc) * pm_img.to(acc).unsqueeze(-1)).sum(1)  # (B, D)
    s2 = (xi.to(acc) ** 2 * pm_img.to(acc).unsqueeze(-1)).sum(1)
    nb = pmask.sum(-1).clamp_min(1).to(acc).view(B, 1)
    var = (s2 / nb - (s1 / nb) ** 2).clamp_min(0)  # (B, D)
    tol_t = torch.as_tensor(tol, dtype=acc, device=dev)
    tol_p = (tol_t * (var[img] * colmask.to(acc)).sum(-1) / dims.to(acc)).to(dt)  # (P,)

    centres = _kmeanspp(xi, x2, pmask, img, colmask, n, k, I, seed).reshape(Q, C, D)
    # restarts sorted by K, so that groups of similar K are contiguous slices (see _KGroups)
    q_img, q_k, q_dims = img.repeat_interleave(I), k.repeat_interleave(I), dims.repeat_interleave(I)
    q_order = torch.sort(q_k, stable=True).indices  # restart ids, in K order
    qa = q_order
    rows = xi.reshape(B * N, D)
    xT = xi.transpose(1, 2)
    # tie tolerance of each point: rounding of ||x||² + ||c||² (the full-D ||x||² >= each problem's)
    x2_img = cum2[..., -1]  # (B, N)
    tie = (TIE_RTOL[dt] * x2_img).unsqueeze(1), torch.tensor(TIE_RTOL[dt], dtype=dt, device=dev)
    # float64 rows with a trailing 1: one index_add moves a point's coordinates and count
    rows1 = torch.cat([rows.to(acc), torch.ones(B * N, 1, dtype=acc, device=dev)], 1)  # (B*N, D+1)
    ar_c = torch.arange(C, device=dev)
    # state of the active (not yet converged) restarts, kept compact: gathered only when the
    # active set shrinks
    img_a, k_a, dims_a = q_img[qa], q_k[qa], q_dims[qa]
    pm_a = pmask[img_a]  # (A, N)
    col_a = colmask.repeat_interleave(I, dim=0)[qa].to(dt).unsqueeze(1)  # (A, 1, D)
    tol_a = tol_p.repeat_interleave(I)[qa]
    cen_a = centres[qa]
    lab_a = torch.full((Q, N), -1.0, dtype=dt, device=dev)  # nearest centre, as float
    sums_a = torch.zeros(Q, C, D + 1, dtype=acc, device=dev)  # float64 cluster sums, then counts
    bufs = _ScoreBuffers()
    groups = None
    policy = cluster_policy(dev)
    compact_below = policy.compact_below if compact_below is None else compact_below
    max_groups = policy.max_groups if max_groups is None else max_groups
    alive_a = torch.ones(Q, dtype=torch.bool, device=dev)
    n_alive = Q
    it = 0
    for it in range(1, max_iter + 1):
        if groups is None:
            groups = _KGroups(k_a, dims_a, img_a, B, N, max_groups)
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
            new = _relocate_empty(new, cen_a, empty, lab_a.long(), img_a, col_a, pm_a, xi, sums_a, rows1)
        shift = ((new - cen_a) ** 2).sum((-1, -2))  # (A,)
        cen_a = new
        if it % check_every == 0 or it == max_iter:
            still = (shift > tol_a) & alive_a
            n_still = int(still.sum())  # one host read answers "all?" and "any?"
            if n_still < n_alive:
                done = (alive_a & ~still).nonzero().squeeze(1)
                centres.index_copy_(0, qa.index_select(0, done), cen_a.index_select(0, done))
                if n_still == 0:
                    break
                alive_a, n_alive = still, n_still
                if n_still <= compact_below * still.numel():
                    keep = still.nonzero().squeeze(1)  # one sync, then index_select: no per-tensor mask sync
                    qa, img_a, k_a, dims_a, pm_a, col_a, tol_a, cen_a, lab_a, sums_a, alive_a = (
                        t.index_select(0, keep)
                        for t in (qa, img_a, k_a, dims_a, pm_a, col_a, tol_a, cen_a, lab_a, sums_a, alive_a))
                    groups = None
    else:
        live = alive_a.nonzero().squeeze(1)
        centres.index_copy_(0, qa.index_select(0, live), cen_a.index_select(0, live))
    # final assignment with the final centres of every restart (in K order, then back)
    lab_s, mind_s = _KGroups(q_k[q_order], q_dims[q_order], q_img[q_order], B, N, max_groups).nearest(
        centres[q_order], xT, tie, bufs, with_min=True)
    lab = torch.empty_like(lab_s).index_copy_(0, q_order, lab_s).long()
    mind = torch.empty_like(mind_s).index_copy_(0, q_order, mind_s)
    x2q = x2.repeat_interleave(I, dim=0)
    q_pm = pmask[q_img]
    inertia = ((mind + x2q).clamp_min(0) * q_pm.to(dt)).sum(-1).view(P, I)
    # lowest restart index among (numerically) equal inertias, so float noise never decides
    near = inertia <= inertia.min(-1, keepdim=True).values * (1 + TIE_RTOL[dt]) + 1e-300
    best = near.to(torch.int8).argmax(-1)
    qb = torch.arange(P, device=dev) * I + best
    pm_p = pmask[img]
    labels_b, perm = canonical_labels(lab[qb], C, pm_p)
    centers = centres[qb].gather(1, perm.unsqueeze(-1).expand(P, C, D))
    return KMeansResult(labels=labels_b, centers=centers, inertia=inertia.gather(1, best.view(P, 1)).squeeze(1), n_iter=it)


class _KGroups:
    """Restarts sorted by K, cut into contiguous groups of similar K.

    Each group is scored on its own (one GEMM per image and group), padded only to the group's
    largest K (centres) and number of coordinates, instead of the batch's. The cut minimises
    the padded work ``sum(A_g * Cm_g * (D_g + 8))`` plus a fixed cost per group (the work of
    about 3 restarts of K = 10 on this image size, i.e. the launch overhead of a group's ops).
    Results do not depend on the cut.
    """

    def __init__(self, k: Tensor, dims: Tensor, img: Tensor, n_images: int, n_points: int,
                 max_groups: int) -> None:
        kl, dl = k.tolist(), dims.tolist()
        A = len(kl)
        starts = [0] + [i for i in range(1, A) if kl[i] != kl[i - 1]]
        ends = starts[1:] + [A]
        G = len(starts)
        dmax = [max(dl[s:e]) for s, e in zip(starts, ends)]
        fixed = 3 * 10 * 18 * max(1, 1500 // max(n_points, 1))

        def cost(a: int, b: int) -> float:  # distinct-K runs a .. b-1
            return (ends[b - 1] - starts[a]) * kl[ends[b - 1] - 1] * (max(dmax[a:b]) + 8) + fixed

        inf = float("inf")
        best = [[inf] * (G + 1) for _ in range(max_groups + 1)]
        arg = [[0] * (G + 1) for _ in range(max_groups + 1)]
        best[0][0] = 0.0
        for j in range(1, max_groups + 1):
            for b in range(1, G + 1):
                for a in range(j - 1, b):
                    c = best[j - 1][a] + cost(a, b)
                    if c < best[j][b]:
                        best[j][b], arg[j][b] = c, a
        ng = min(range(1, min(max_groups, G) + 1), key=lambda j: best[j][G])
        cuts = []
        b = G
        for j in range(ng, 0, -1):
            a = arg[j][b]
            cuts.append((starts[a], ends[b - 1], kl[ends[b - 1] - 1], max(dmax[a:b])))
            b = a
        ar = torch.arange(max(kl) if kl else 1, device=k.device)
        self.groups = [(s, e, cm, dg, _Layout(img[s:e], n_images, self._chunk(img[s:e], n_images)),
                        ar[:cm].view(1, cm) >= k[s:e].view(-1, 1)) for s, e, cm, dg in reversed(cuts)]
        self._rows: dict[int, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _chunk(img: Tensor, n_images: int) -> int | None:
        """Rows of 16 restarts when one row per image (with restarts here) would pad more than 25 %
        (images with very different numbers of restarts), else one row per image."""
        if n_images == 1:
            return None
        counts = torch.bincount(img, minlength=n_images)
        present, most = int((counts > 0).sum()), int(counts.max())
        return None if present * most <= 1.25 * img.numel() else 16

    def nearest(self, cen: Tensor, xT: Tensor, tie: tuple[Tensor, Tensor], bufs: _ScoreBuffers,
                with_min: bool = False) -> tuple[Tensor, Tensor] | Tensor:
        """Index of the nearest centre as float ``(A, N)`` (and the score at it, ``with_min``)."""
        A, N = cen.shape[0], xT.shape[-1]
        lab = torch.empty(A, N, dtype=cen.dtype, device=cen.device)
        mind = torch.empty(A, N, dtype=cen.dtype, device=cen.device) if with_min else None
        for gi, (s, e, cm, dg, layout, pad) in enumerate(self.groups):  # a few groups, not a per-K loop
            if layout.row_img is None:
                xg, tg = xT[:, :dg], tie[0]
            else:  # the points (and ties) of each row's image, gathered once per grouping
                if gi not in self._rows:
                    self._rows[gi] = (xT[:, :dg].index_select(0, layout.row_img), tie[0].index_select(0, layout.row_img))
                xg, tg = self._rows[gi]
            code, m = _nearest_code(cen[s:e, :cm, :dg], pad, layout, xg, tg, tie[1], bufs, with_min)
            torch.sub(cm, code, out=lab[s:e])
            if mind is not None:
                mind[s:e] = m
        return (lab, mind) if mind is not None else lab


def _relocate_empty(new: Tensor, cen: Tensor, empty: Tensor, lab: Tensor, img: Tensor, col: Tensor, pm: Tensor,
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


class _ScoreBuffers:
    """Reusable score and hit buffers of :func:`_nearest_code` (on the CPU, a fresh large
    allocation at every Lloyd step costs page faults)."""

    def __init__(self) -> None:
        self.score: Tensor | None = None
        self.hit: Tensor | None = None

    def get(self, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
        numel = math.prod(shape)
        if self.score is None or self.hit is None or self.score.numel() < numel or self.score.dtype != like.dtype:
            self.score = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.hit = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.score[:numel].view(shape), self.hit[:numel].view(shape)


class _Layout:
    """Restarts laid out in rows of ``M`` slots for the batched GEMM of :func:`_nearest_code`.

    Without ``chunk``, a row is an image that has restarts here (``M`` = the largest number of
    restarts of an image); ``identity`` when that is the restarts' own order (one image, or
    equal counts in image order). With ``chunk``, each image's restarts fill rows of ``chunk``
    slots, so that images with few restarts waste at most ``chunk − 1`` slots each, and
    ``row_img`` names each row's image.
    """

    def __init__(self, img: Tensor, n_images: int, chunk: int | None = None) -> None:
        A = img.numel()
        dev = img.device
        if chunk is None or n_images == 1:
            present = torch.unique(img)  # sorted; rows only for images that have restarts here
            self.row_img = None if present.numel() == n_images else present  # None: row b is image b
            row = img if self.row_img is None else torch.searchsorted(present, img)
            self.rows = present.numel()
            rank, counts = _rank_in_group(row, self.rows)
            self.M = max(int(counts.max()), 1) if A else 1
            self.slot = row * self.M + rank
            self.identity = (self.row_img is None and A == n_images * self.M
                             and bool((self.slot == torch.arange(A, device=dev)).all()))
            return
        rank, counts = _rank_in_group(img, n_images)
        per = (counts + chunk - 1) // chunk  # rows of each image
        first = per.cumsum(0) - per
        self.slot = (first[img] + rank // chunk) * chunk + rank % chunk
        self.M = chunk
        self.rows = int(per.sum())
        self.row_img = torch.repeat_interleave(torch.arange(n_images, device=dev), per)
        self.identity = False


def _nearest_code(cen: Tensor, pad: Tensor, layout: _Layout, xT: Tensor, tie: Tensor, tie_rtol_c: Tensor,
                  bufs: _ScoreBuffers, with_min: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest centre of every point, for restarts laid out by image.

    ``cen (A, C, D)`` centres, ``pad (A, C)`` True on padding centres (index ``>= K``),
    ``xT (B, D, N)`` points, ``tie (B, 1, N) = TIE_RTOL ||x||²`` and ``tie_rtol_c = TIE_RTOL``
    (a 0-d tensor). One GEMM per image scores ``||c||² − 2 x·c`` for all its restarts at once.
    Scores within ``TIE_RTOL (||x||² + max ||c||²)`` of the minimum count as ties and go to the
    first centre, so that exact ties (a point equidistant from two centres, e.g. an all-zero
    feature row) never depend on rounding, hence on the batch.

    Returns the float code ``C − index`` of the nearest centre ``(A, N)`` and, with
    ``with_min``, the score at the minimum ``(A, N)``.
    """
    A, C, D = cen.shape
    B, M = layout.rows, layout.M  # rows of the batched GEMM (xT holds one (D, N) per row)
    N = xT.shape[-1]
    c2 = (cen * cen).sum(-1)
    c2max = c2.masked_fill(pad, 0).amax(-1)  # (A,)
    c2.masked_fill_(pad, float("inf"))
    if layout.identity:
        c2s, cs = c2, cen
    else:
        c2s = torch.full((B * M, C), float("inf"), dtype=cen.dtype, device=cen.device)
        c2s[layout.slot] = c2
        cs = _slots(cen, layout.slot, B * M)
        c2max = _slots(c2max, layout.slot, B * M)
    score, hit = bufs.get((B, M * C, N), cen)
    torch.baddbmm(c2s.reshape(B, M * C, 1), cs.reshape(B, M * C, D), xT, alpha=-2, out=score)
    score = score.view(B * M, C, N)
    # (on the CPU, min-with-index over a strided dim is ~20x slower than the value-only amin, and
    # a comparison into bool ~5x slower than into float: float ops only)
    mind = score.amin(1)  # (B*M, N)
    thr = torch.addcmul(mind.view(B, M, N) + tie, c2max.view(B, M, 1), tie_rtol_c)  # mind + rtol (x2 + c2max)
    hit = torch.le(score, thr.view(B * M, 1, N), out=hit.view(B * M, C, N))
    hit.mul_(torch.arange(C, 0, -1, dtype=score.dtype, device=score.device).view(1, C, 1))
    code = hit.amax(1)
    if not layout.identity:
        code = code[layout.slot]
        mind = mind[layout.slot] if with_min else mind
    return code, mind


#: relative tolerance under which two squared distances count as tied (see :func:`_nearest_code`)
TIE_RTOL: dict[torch.dtype, float] = {
    torch.float32: 32 * torch.finfo(torch.float32).eps,
    torch.float64: 32 * torch.finfo(torch.float64).eps,
    torch.float16: 32 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 32 * torch.finfo(torch.bfloat16).eps,
}


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
    P, N, d = x.shape
    dev = x.device
    if point_mask is None:
        point_mask = labels >= 0
    point_mask = point_mask.to(device=dev, dtype=torch.bool)
    C = int(labels.max()) + 1 if n_clusters is None else int(n_clusters)
    if P == 0 or N == 0:
        return x.new_zeros(P, N)
    x = x * point_mask.to(x.dtype).unsqueeze(-1)
    dims = torch.full((P,), d, dtype=torch.long, device=dev)
    return _silhouette_images(x, point_mask, torch.arange(P, device=dev), dims, labels, max(C, 1), max_block_elements)


def _silhouette_images(xi: Tensor, pmask: Tensor, img: Tensor, dims: Tensor, labels: Tensor, C: int,
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
                out[sel, r0:r1] = _silhouette_block(d2, diff, img[sel] - b0, lab[sel], counts[sel], pm_p[sel], C, r0, r1)
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
    return _mean_silhouette(s, labels, C, point_mask)


def _mean_silhouette(s: Tensor, labels: Tensor, C: int, point_mask: Tensor) -> Tensor:
    """Mean of per-point silhouettes ``s (P, N)``; NaN with fewer than 2 or with n clusters."""
    n = point_mask.sum(-1).clamp_min(1)
    score = s.sum(-1) / n.to(s.dtype)
    # count members per cluster (scatter_add: padded points, clamped to label 0, add nothing;
    # a plain scatter_ of the mask would let them overwrite cluster 0's flag)
    counts = torch.zeros(labels.shape[0], max(C, 1), dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels.clamp_min(0), point_mask.long())
    n_present = (counts > 0).sum(-1)
    return torch.where((n_present >= 2) & (n_present < point_mask.sum(-1)), score, torch.full_like(score, float("nan")))


def best_in_band(scores: Tensor) -> Tensor:
    """Column of the best score per row; ties go to the first (smaller K); NaN never wins.

    Example:
        >>> best_in_band(torch.tensor([[0.2, 0.5, 0.5], [float("nan"), 0.1, 0.0]]))
        tensor([1, 1])
    """
    return torch.nan_to_num(scores, nan=-math.inf).argmax(-1)


@dataclass
class ClusterSelection:
    """Outcome of the K search for a batch of images.

    Attributes:
        labels: ``(B, N)`` patch labels of the chosen K (``-1`` on padding).
        k: ``(B,)`` chosen number of clusters.
        k_values: ``(Kc,)`` the K grid shared by the batch (``k_min .. max k_hi``).
        scores: ``(B, Kc)`` mean silhouette for every K of each image's band (NaN outside).
        band_labels: ``(B, Kc, N)`` patch labels of every K of each image's band (``-1`` on
            padding and for K outside the band), only with ``select_k(..., keep_band=True)``;
            they are the clusterings the silhouette compared, kept at no extra clustering cost.
    """

    labels: Tensor
    k: Tensor
    k_values: Tensor
    scores: Tensor
    band_labels: Tensor | None = None


def select_k(
    embedding: Tensor,
    mask: Tensor,
    k_lo: Tensor,
    k_hi: Tensor,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_block_elements: int | None = None,
    max_problems: int | None = None,
    keep_band: bool = False,
) -> ClusterSelection:
    """Run k-means for every K of every image's band at once and keep the best silhouette.

    Args:
        embedding: ``(B, N, M)`` spectral embedding (eigenvectors as columns, descending).
        mask: ``(B, N)`` real patches.
        k_lo, k_hi: ``(B,)`` inclusive K band; ``k_hi < k_lo`` gives a single segment.
        n_init, max_iter, tol, seed: k-means settings (see :func:`kmeans`).
        dtype: compute dtype of k-means and silhouette (float32; float64 for exactness tests).
        max_block_elements: memory bound of the silhouette's distance blocks (elements of one
            ``(images, N, rows)`` block). ``None``: :func:`cluster_policy` (``2**25`` on the
            CPU, ``2**27`` elsewhere); the silhouettes do not depend on it.
        max_problems: process at most this many (image, K) problems at once (memory bound);
            default: all at once.
        keep_band: also return the labels of every K of the band (``band_labels``).

    Returns:
        :class:`ClusterSelection`. Ties in silhouette go to the smaller K.
    """
    if embedding.dim() != 3:
        raise ValueError(f"embedding must have shape (B, N, M), got {tuple(embedding.shape)}")
    if not embedding.is_floating_point():
        raise ValueError(f"embedding must be a floating-point tensor, got dtype {embedding.dtype}")
    B, N, M = embedding.shape
    dev = embedding.device
    if max_block_elements is None:
        max_block_elements = cluster_policy(dev).max_block_elements
    if mask.shape != (B, N):
        raise ValueError(f"mask must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
    mask = mask.to(device=dev, dtype=torch.bool)
    n = mask.sum(-1)
    k_lo = torch.as_tensor(k_lo, device=dev)
    k_hi = torch.as_tensor(k_hi, device=dev)
    for name, t in (("k_lo", k_lo), ("k_hi", k_hi)):
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape (B,) = {(B,)}, got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    k_lo = k_lo.long()
    k_hi = k_hi.long()
    band = k_hi >= k_lo
    if bool((band & (k_lo < 1)).any()):
        raise ValueError(f"k_lo must be >= 1 wherever the band is non-empty, got {k_lo.tolist()}")
    if bool((band & (k_hi > n)).any()):
        raise ValueError(f"k_hi must not exceed the number of real points n = {n.tolist()}, got {k_hi.tolist()}")
    n_init, max_iter, _, seed, tol = _check_settings(n_init, max_iter, 1, seed, tol)
    if max_problems is not None:
        max_problems = _check_int("max_problems", max_problems, 1)
    kmin_all = int(k_lo.min()) if B else 2
    kmax_all = int(k_hi.max()) if B else 1
    labels_out = torch.full((B, N), -1, dtype=torch.long, device=dev)
    labels_out[mask] = 0
    if kmax_all < kmin_all:
        return ClusterSelection(labels_out, torch.ones(B, dtype=torch.long, device=dev),
                                torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(B, 0, dtype=dtype, device=dev),
                                labels_out.new_full((B, 0, N), -1) if keep_band else None)
    k_values = torch.arange(kmin_all, kmax_all + 1, device=dev)
    Kc = k_values.numel()
    in_band = (k_values.view(1, Kc) >= k_lo.view(B, 1)) & (k_values.view(1, Kc) <= k_hi.view(B, 1))
    b_idx, kc_idx = in_band.nonzero(as_tuple=True)  # problems (P,)
    kp = k_values[kc_idx]
    P = b_idx.numel()
    D = min(M, kmax_all)
    emb = embedding[..., :D].to(dtype) * mask.to(dtype).unsqueeze(-1)
    scores = torch.full((B, Kc), float("nan"), dtype=dtype, device=dev)
    if P == 0:  # every band is empty: one segment per image
        return ClusterSelection(labels_out, torch.ones(B, dtype=torch.long, device=dev), k_values, scores,
                                labels_out.new_full((B, Kc, N), -1) if keep_band else None)
    all_labels = torch.empty(P, N, dtype=torch.long, device=dev)
    step = max(P, 1) if max_problems is None else max(1, max_problems)  # P = 0: every band empty
    for s0 in range(0, P, step):  # memory-bounding chunks, not a per-image loop
        sl = slice(s0, min(P, s0 + step))
        bi, kk = b_idx[sl], kp[sl]
        dims = kk.clamp(max=D)  # K clusters in the first K eigenvectors (all of them when fewer)
        res = _kmeans_images(emb, mask, bi, dims, kk, n_init, max_iter, tol, seed, 1)
        C = int(kk.max())
        s = _silhouette_images(emb, mask, bi, dims, res.labels, C, max_block_elements)
        sc = _mean_silhouette(s, res.labels, C, mask[bi])
        scores[bi, kc_idx[sl]] = sc
        all_labels[sl] = res.labels
    best_kc = best_in_band(scores)
    has_band = k_hi >= k_lo
    # locate the chosen problem of each image
    prob_of = torch.full((B, Kc), -1, dtype=torch.long, device=dev)
    prob_of[b_idx, kc_idx] = torch.arange(P, device=dev)
    chosen = prob_of.gather(1, best_kc.view(B, 1)).squeeze(1)
    # A band where every silhouette is NaN (fewer than two distinct points: duplicates, a
    # uniform image) is a single segment, not K clusters of which only one is populated.
    best_score = scores.gather(1, best_kc.view(B, 1)).squeeze(1) if Kc else scores.new_zeros(B)
    ok = has_band & (chosen >= 0) & ~torch.isnan(best_score)
    labels = torch.where(ok.view(B, 1), all_labels[chosen.clamp_min(0)], labels_out)
    k = torch.where(ok, k_values[best_kc], torch.ones_like(best_kc))
    band_labels = None
    if keep_band:
        band_labels = labels_out.new_full((B, Kc, N), -1)
        band_labels[b_idx, kc_idx] = all_labels
    return ClusterSelection(labels=labels, k=k, k_values=k_values, scores=scores, band_labels=band_labels)


class KBandClustering(nn.Module):
    """Module wrapper around :func:`select_k` (consumes a :class:`SpectralResult`).

    Shape:
        - input: ``SpectralResult`` with eigenvectors ``(B, N, M)``, ``k_lo``/``k_hi`` ``(B,)``
        - output: :class:`ClusterSelection` with labels ``(B, N)``
    """

    def __init__(self, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
                 dtype: torch.dtype = torch.float32, max_problems: int | None = None) -> None:
        super().__init__()
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        self.n_init, self.max_iter, self.tol, self.seed = n_init, max_iter, tol, seed
        self.dtype = dtype
        self.max_problems = max_problems

    def forward(self, spectral: SpectralResult, k_lo: Tensor, k_hi: Tensor) -> ClusterSelection:
        return select_k(spectral.eigenvectors, spectral.mask, k_lo, k_hi, n_init=self.n_init,
                        max_iter=self.max_iter, tol=self.tol, seed=self.seed, dtype=self.dtype,
                        max_problems=self.max_problems)

    def extra_repr(self) -> str:
        return f"n_init={self.n_init}, max_iter={self.max_iter}, tol={self.tol}, seed={self.seed}"
