"""Clustering stage of CLASP: batched k-means, exact mean silhouette, K selection.

All K of every image's band, all images and all k-means restarts run as one batch of
"problems". A problem ``p`` is one (image, K) pair; it clusters the ``n_b`` real patches of its
image in the space of the first ``K`` eigenvectors into ``K`` clusters. Problems are stored
padded: points ``(P, N, d)`` with a point mask, and ``K`` per problem (centres beyond ``K`` are
masked out, coordinates beyond ``K`` are zero so they do not change any distance).

Randomness comes from a counter-based hash of ``(seed, K, restart, centre, trial)``, so the
result of an image depends only on the seed and its own data: the same image gives the same
labels alone or inside any batch, on any device.
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
    h = torch.as_tensor(seed & _MASK32, dtype=torch.int64)
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


def _kmeanspp(x: Tensor, x2: Tensor, pmask: Tensor, n: Tensor, k: Tensor, n_init: int, seed: int) -> Tensor:
    """Greedy k-means++ initialisation, batched over problems and restarts.

    Returns centres ``(P, I, C, d)``.
    """
    P, N, d = x.shape
    C = int(k.max())
    dev = x.device
    I = n_init
    # sklearn's 2 + log(K) local trials, per problem: with the batch's largest K instead, an
    # image's result would depend on the other images of its batch
    trials = 2 + int(math.log(max(C, 2)))
    trials_p = 2 + torch.log(k.clamp_min(2).double()).floor().long()  # (P,)
    ar_i = torch.arange(I, device=dev).view(1, I)
    kk = k.view(P, 1)
    # first centre: uniform among the real points
    u0 = hash_uniform(seed, kk, ar_i, torch.zeros(1, 1, dtype=torch.long, device=dev), torch.zeros(1, 1, dtype=torch.long, device=dev))
    first = (u0 * n.view(P, 1).double()).long().clamp(max=N - 1)  # (P, I)
    centres = torch.zeros(P, I, C, d, dtype=x.dtype, device=dev)
    pts = x.gather(1, first.reshape(P, I, 1).expand(P, I, d))  # (P, I, d)
    centres[:, :, 0] = pts
    fm = pmask.to(x.dtype).unsqueeze(1)  # (P, 1, N)
    closest = ((x.unsqueeze(1) - pts.unsqueeze(2)) ** 2).sum(-1) * fm  # (P, I, N)
    ar_t = torch.arange(trials, device=dev).view(1, 1, trials)
    ar_q = torch.arange(P * I, device=dev)
    xt = x.transpose(1, 2).contiguous()  # (P, d, N)
    for c in range(1, C):
        pot = closest.sum(-1, keepdim=True)  # (P, I, 1)
        u = hash_uniform(seed, kk.unsqueeze(-1), ar_i.unsqueeze(-1), torch.full((1, 1, 1), c, device=dev), ar_t)
        cum = closest.cumsum(-1)  # (P, I, N)
        target = u.to(x.dtype) * pot  # (P, I, T)
        cand = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=N - 1)
        cand = torch.minimum(cand, (n.view(P, 1, 1) - 1))
        cpts = x.gather(1, cand.reshape(P, I * trials, 1).expand(P, I * trials, d)).reshape(P, I, trials, d)
        # distances of every point to every candidate, (x2 - 2 x·c) + c2 evaluated in place: (P, I, T, N)
        cd = torch.bmm(cpts.view(P, I * trials, d), xt).view(P, I, trials, N)
        cd.mul_(-2).add_(x2[:, None, None, :]).add_((cpts * cpts).sum(-1, keepdim=True)).clamp_min_(0)
        # padded points keep closest = 0 (cd >= 0), so no mask is needed here
        newc = torch.minimum(cd, closest.unsqueeze(2), out=cd)
        pot_t = newc.sum(-1).masked_fill(ar_t >= trials_p.view(P, 1, 1), float("inf"))
        best = pot_t.argmin(-1)  # (P, I)
        closest = newc.view(P * I, trials, N)[ar_q, best.view(-1)].view(P, I, N)
        chosen = cpts.gather(2, best.view(P, I, 1, 1).expand(P, I, 1, d)).squeeze(2)
        active = (c < k).view(P, 1, 1).to(x.dtype)
        centres[:, :, c] = chosen * active
    return centres


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
        tol: convergence when the squared centre shift of every restart is at most
            ``tol`` times the mean per-dimension variance of its problem (sklearn's rule).
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
    k = torch.as_tensor(k, device=dev)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise ValueError(f"k must hold integers, got dtype {k.dtype}")
    k = k.long().view(-1)
    if k.shape[0] != P:
        raise ValueError(f"k must have one entry per problem ({P}), got {k.shape[0]}")
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    check_every = _check_int("check_every", check_every, 1)
    seed = _check_int("seed", seed)
    if not float(tol) >= 0.0:  # also rejects NaN
        raise ValueError(f"tol must be >= 0, got {tol}")
    n = point_mask.sum(-1)
    if bool((k < 1).any()) or bool((k > n).any()):
        raise ValueError("k must satisfy 1 <= k <= number of points for every problem")
    if not bool(torch.isfinite(x[point_mask]).all()):
        raise ValueError("x contains NaN or Inf values")
    if P == 0:
        return KMeansResult(labels=torch.full((0, N), -1, dtype=torch.long, device=dev),
                            centers=x.new_zeros(0, 0, d), inertia=x.new_zeros(0), n_iter=0)
    C = int(k.max())
    x = x * point_mask.to(x.dtype).unsqueeze(-1)
    # Size buckets: every problem of a bucket is padded only to the bucket's largest K (centres)
    # and to its largest used dimension (trailing all-zero coordinates change no distance, no
    # centre), instead of to the batch's largest. Results do not depend on the bucketing.
    used = (x != 0).any(1)  # (P, d)
    ar_d = torch.arange(1, d + 1, device=dev)
    deff = (used.long() * ar_d).amax(-1).clamp_min(1)  # (P,) last used coordinate + 1
    buckets = _size_buckets(k, deff, 2 if dev.type == "cuda" else 4)
    if len(buckets) == 1:
        de = int(deff.max())
        lab, cen, inertia, n_iter = _kmeans_core(x[..., :de].contiguous(), k, point_mask, n, n_init, max_iter, tol, seed, check_every, d)
        centers = cen if de == d else torch.nn.functional.pad(cen, (0, d - de))
        return KMeansResult(labels=lab, centers=centers, inertia=inertia, n_iter=n_iter)
    labels = torch.empty(P, N, dtype=torch.long, device=dev)
    centers = x.new_zeros(P, C, d)
    inertia = x.new_zeros(P)
    n_iter = 0
    for idx in buckets:
        de = int(deff[idx].max())
        lab, cen, ine, it = _kmeans_core(x[idx][..., :de].contiguous(), k[idx], point_mask[idx], n[idx], n_init, max_iter,
                                         tol, seed, check_every, d)
        labels[idx] = lab
        centers[idx, : cen.shape[1], :de] = cen
        inertia[idx] = ine
        n_iter = max(n_iter, it)
    return KMeansResult(labels=labels, centers=centers, inertia=inertia, n_iter=n_iter)


def _size_buckets(k: Tensor, deff: Tensor, max_buckets: int) -> list[Tensor]:
    """Split problems into at most ``max_buckets`` groups of contiguous K (sorted) that minimise
    the padded work ``sum(count * max K * (max d + 2))``; a further group must save 10 %."""
    order = torch.sort(k, stable=True).indices
    kl = k[order].tolist()
    dl = deff[order].tolist()
    P = len(kl)
    starts = [0] + [i for i in range(1, P) if kl[i] != kl[i - 1]]
    ends = starts[1:] + [P]
    G = len(starts)
    if G == 1 or max_buckets <= 1:
        return [order]

    def cost(a: int, b: int) -> float:  # groups a .. b-1
        lo, hi = starts[a], ends[b - 1]
        return (hi - lo) * kl[hi - 1] * (max(dl[lo:hi]) + 2)

    inf = float("inf")
    best = [[inf] * (G + 1) for _ in range(max_buckets + 1)]
    arg = [[0] * (G + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0.0
    for j in range(1, max_buckets + 1):
        for b in range(1, G + 1):
            for a in range(j - 1, b):
                c = best[j - 1][a] + cost(a, b)
                if c < best[j][b]:
                    best[j][b], arg[j][b] = c, a
    nb = 1
    for j in range(2, min(max_buckets, G) + 1):
        if best[j][G] < best[nb][G] - 0.1 * best[1][G]:
            nb = j
    cuts = []
    b = G
    for j in range(nb, 0, -1):
        a = arg[j][b]
        cuts.append((starts[a], ends[b - 1]))
        b = a
    return [order[lo:hi] for lo, hi in reversed(cuts)]


def _kmeans_core(x: Tensor, k: Tensor, point_mask: Tensor, n: Tensor, n_init: int, max_iter: int, tol: float,
                 seed: int, check_every: int, d_full: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validated, masked problems (``x`` zero on padded points) → labels, centres, inertia, n_iter."""
    P, N, d = x.shape
    dev = x.device
    C = int(k.max())
    I = n_init
    fm = point_mask.to(x.dtype)
    x2 = (x * x).sum(-1)
    cmask = torch.arange(C, device=dev).view(1, 1, C) < k.view(P, 1, 1)  # (P, 1, C)
    # sklearn: tol scaled by the mean variance of the data
    mean = (x.sum(1) / n.view(P, 1).to(x.dtype))
    var = (((x - mean.unsqueeze(1)) ** 2) * fm.unsqueeze(-1)).sum(1) / n.view(P, 1).to(x.dtype)
    tol_p = tol * var.sum(-1) / d_full  # (P,) mean over all d_full coordinates (trimmed ones are 0)

    centres = _kmeanspp(x, x2, point_mask, n, k, I, seed).reshape(P * I, C, d)
    # Restarts become independent problems q = p * I + i; converged ones leave the active set.
    Q = P * I
    xq = x.repeat_interleave(I, dim=0)  # (Q, N, d)
    pmq = point_mask.repeat_interleave(I, dim=0)  # (Q, N)
    cmq = cmask.squeeze(1).repeat_interleave(I, dim=0)  # (Q, C)
    tolq = tol_p.repeat_interleave(I)
    x2q = x2.repeat_interleave(I, dim=0)  # (Q, N)
    # the active (not yet converged) restarts, kept compact: gathered only when the set shrinks
    act = torch.arange(Q, device=dev)
    xa, pa, ca, x2a, tola, cen = xq, pmq, cmq, x2q, tolq, centres.clone()
    it = 0
    for it in range(1, max_iter + 1):
        A = act.numel()
        lab, mind = _assign(xa, cen, ca)  # (A, N)
        flat = torch.where(pa, lab + C * torch.arange(A, device=dev).view(A, 1), A * C)  # padded → dump
        sums = torch.zeros(A * C + 1, d, dtype=x.dtype, device=dev)
        if dev.type == "cpu":  # same serial order as index_add_ (identical sums), about 2x faster on CPU
            sums.index_put_((flat.view(-1),), xa.reshape(-1, d), accumulate=True)
        else:
            sums.index_add_(0, flat.view(-1), xa.reshape(-1, d))
        counts = torch.bincount(flat.view(-1), minlength=A * C + 1)[: A * C].view(A, C)
        new = sums[: A * C].view(A, C, d) / counts.clamp_min(1).unsqueeze(-1).to(x.dtype)
        empty = (counts == 0) & ca
        if bool(empty.any()):
            # relocate empty clusters to the points farthest from their current centre (sklearn)
            dist = (mind + x2a).masked_fill(~pa, -1.0)
            far = dist.topk(C, dim=-1).indices  # (A, C)
            rank = (empty.long().cumsum(-1) - 1).clamp_min(0)
            pick = far.gather(-1, rank)
            repl = xa.gather(1, pick.unsqueeze(-1).expand(A, C, d))
            new = torch.where(empty.unsqueeze(-1), repl, new)
        new = new * ca.unsqueeze(-1).to(x.dtype)
        shift = ((new - cen) ** 2).sum((-1, -2))  # (A,)
        cen = new
        if it % check_every == 0 or it == max_iter:
            still = shift > tola
            if not bool(still.all()):
                done = ~still
                centres[act[done]] = cen[done]
                if not bool(still.any()):
                    break
                act, xa, pa, ca, x2a, tola, cen = (t[still] for t in (act, xa, pa, ca, x2a, tola, cen))
    else:
        centres[act] = cen
    lab, mind = _assign(xq, centres, cmq)
    inertia = ((mind + x2q).clamp_min(0) * pmq.to(x.dtype)).sum(-1).view(P, I)
    # lowest restart index among (numerically) equal inertias, so float noise never decides
    near = inertia <= inertia.min(-1, keepdim=True).values * (1 + 1e-9) + 1e-300
    best = near.to(torch.int8).argmax(-1)
    qb = torch.arange(P, device=dev) * I + best
    labels, perm = canonical_labels(lab[qb], C, point_mask)
    centers = centres[qb].gather(1, perm.unsqueeze(-1).expand(P, C, d))
    return labels, centers, inertia.gather(1, best.view(P, 1)).squeeze(1), it


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


def _assign(x: Tensor, centres: Tensor, cmask: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre of each point: labels ``(Q, N)`` and ``||c||² − 2 x·c`` at the minimum.

    ``x (Q, N, d)``, ``centres (Q, C, d)``, ``cmask (Q, C)``; masked centres never win. The
    score is laid out ``(Q, C, N)`` (points contiguous), which is the faster GEMM and
    reduction layout on both CPU and GPU.
    """
    c2 = (centres * centres).sum(-1).masked_fill(~cmask, float("inf"))  # (Q, C)
    score = torch.baddbmm(c2.unsqueeze(2), centres, x.transpose(1, 2), alpha=-2)  # (Q, C, N)
    C = score.shape[1]
    if score.device.type != "cpu" or C >= 255:
        mind, lab = score.min(1)
        return lab, mind
    # CPU: min-with-index over a strided dim is ~5x slower than the value-only amin; recover the
    # index as the first centre attaining the minimum (the same tie rule as min), in uint8
    mind = score.amin(1)  # (Q, N)
    hit = (score == mind.unsqueeze(1)).view(torch.uint8)  # (Q, C, N)
    hit.mul_(torch.arange(C, 0, -1, dtype=torch.uint8, device=score.device).view(1, C, 1))
    lab = C - hit.amax(1).long()
    return lab, mind


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
        max_block_elements: bound on the elements of each distance block ``(P, rows, N)``
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
    C = max(C, 1)
    if P == 0 or N == 0:
        return x.new_zeros(P, N)
    # size buckets as in kmeans: a problem's cost is N² (d + C), padded to its bucket's largest
    # number of clusters and used dimension instead of the batch's
    fmx = point_mask.to(x.dtype).unsqueeze(-1)
    used = ((x * fmx) != 0).any(1)  # (P, d)
    deff = (used.long() * torch.arange(1, d + 1, device=dev)).amax(-1).clamp_min(1)
    cp = (labels.masked_fill(~point_mask, 0).amax(-1) + 1).clamp(1, C)
    buckets = _size_buckets(cp, deff, 2 if dev.type == "cuda" else 4)
    if len(buckets) == 1:
        de = int(deff.max())
        return _silhouette_core(x[..., :de], labels, C, point_mask, max_block_elements)
    out = x.new_zeros(P, N)
    for idx in buckets:
        de = int(deff[idx].max())
        out[idx] = _silhouette_core(x[idx][..., :de], labels[idx], int(cp[idx].max()), point_mask[idx], max_block_elements)
    return out


def _silhouette_core(x: Tensor, labels: Tensor, C: int, point_mask: Tensor, max_block_elements: int) -> Tensor:
    P, N, d = x.shape
    dev = x.device
    fm = point_mask.to(x.dtype)
    lab = labels.clamp_min(0)
    onehot = torch.nn.functional.one_hot(lab, C).to(x.dtype) * fm.unsqueeze(-1)  # (P, N, C)
    counts = onehot.sum(1)  # (P, C)
    # centring reduces cancellation in the ||x||² + ||y||² − 2xy expansion
    mean = (x * fm.unsqueeze(-1)).sum(1, keepdim=True) / fm.sum(1).clamp_min(1).view(P, 1, 1)
    xc = (x - mean) * fm.unsqueeze(-1)
    rows = max(1, min(N, max_block_elements // max(1, P * N)))
    out = torch.zeros(P, N, dtype=x.dtype, device=dev)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        # one GEMM on augmented rows [-2x, |x|², 1]·[y, 1, |y|²] (cdist's matmul path) instead of
        # materialising the expanded |y|² term; clamp at 0 then sqrt, as before
        dist = torch.cdist(xc[:, r0:r1], xc, compute_mode="use_mm_for_euclid_dist")  # (P, R, N)
        # the diagonal must be exactly zero
        ar = torch.arange(r0, r1, device=dev)
        dist[:, ar - r0, ar] = 0
        sums = dist @ onehot  # (P, R, C)
        own = lab[:, r0:r1]
        own_cnt = counts.gather(1, own)  # (P, R)
        a = sums.gather(2, own.unsqueeze(-1)).squeeze(-1) / (own_cnt - 1).clamp_min(1)
        mean_other = sums / counts.clamp_min(1).unsqueeze(1)
        excl = (counts.unsqueeze(1) == 0) | torch.nn.functional.one_hot(own, C).bool()
        b = mean_other.masked_fill(excl, float("inf")).min(-1).values
        den = torch.maximum(a, b)
        s = torch.where(den > 0, (b - a) / den.clamp_min(1e-300), torch.zeros_like(a))
        s = torch.where(torch.isfinite(b) & (own_cnt > 1), s, torch.zeros_like(s))
        out[:, r0:r1] = s * fm[:, r0:r1]
    return out


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
    n = point_mask.sum(-1).clamp_min(1)
    score = s.sum(-1) / n.to(s.dtype)
    C = int(labels.max()) + 1 if n_clusters is None else int(n_clusters)
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
    """

    labels: Tensor
    k: Tensor
    k_values: Tensor
    scores: Tensor


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
    max_block_elements: int = 2**25,
    max_problems: int | None = None,
) -> ClusterSelection:
    """Run k-means for every K of every image's band at once and keep the best silhouette.

    Args:
        embedding: ``(B, N, M)`` spectral embedding (eigenvectors as columns, descending).
        mask: ``(B, N)`` real patches.
        k_lo, k_hi: ``(B,)`` inclusive K band; ``k_hi < k_lo`` gives a single segment.
        n_init, max_iter, tol, seed: k-means settings (see :func:`kmeans`).
        dtype: compute dtype of k-means and silhouette (float32; float64 for exactness tests).
        max_block_elements: memory bound of the silhouette's distance blocks.
        max_problems: process at most this many (image, K) problems at once (memory bound);
            default: all at once.

    Returns:
        :class:`ClusterSelection`. Ties in silhouette go to the smaller K.
    """
    if embedding.dim() != 3:
        raise ValueError(f"embedding must have shape (B, N, M), got {tuple(embedding.shape)}")
    if not embedding.is_floating_point():
        raise ValueError(f"embedding must be a floating-point tensor, got dtype {embedding.dtype}")
    B, N, M = embedding.shape
    dev = embedding.device
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
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    seed = _check_int("seed", seed)
    if max_problems is not None:
        max_problems = _check_int("max_problems", max_problems, 1)
    kmin_all = int(k_lo.min()) if B else 2
    kmax_all = int(k_hi.max()) if B else 1
    labels_out = torch.full((B, N), -1, dtype=torch.long, device=dev)
    labels_out[mask] = 0
    if kmax_all < kmin_all:
        return ClusterSelection(labels_out, torch.ones(B, dtype=torch.long, device=dev),
                                torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(B, 0, dtype=dtype, device=dev))
    k_values = torch.arange(kmin_all, kmax_all + 1, device=dev)
    Kc = k_values.numel()
    in_band = (k_values.view(1, Kc) >= k_lo.view(B, 1)) & (k_values.view(1, Kc) <= k_hi.view(B, 1))
    b_idx, kc_idx = in_band.nonzero(as_tuple=True)  # problems (P,)
    kp = k_values[kc_idx]
    P = b_idx.numel()
    D = min(M, kmax_all)
    emb = embedding[..., :D].to(dtype)
    scores = torch.full((B, Kc), float("nan"), dtype=dtype, device=dev)
    if P == 0:  # every band is empty: one segment per image
        return ClusterSelection(labels_out, torch.ones(B, dtype=torch.long, device=dev), k_values, scores)
    all_labels = torch.empty(P, N, dtype=torch.long, device=dev)
    step = max(P, 1) if max_problems is None else max(1, max_problems)  # P = 0: every band empty
    for s0 in range(0, P, step):  # memory-bounding chunks, not a per-image loop
        sl = slice(s0, min(P, s0 + step))
        bi, kk = b_idx[sl], kp[sl]
        x = emb[bi]  # (p, N, D)
        colmask = torch.arange(D, device=dev).view(1, 1, D) < kk.view(-1, 1, 1)
        x = x * colmask.to(dtype)
        pm = mask[bi]
        res = kmeans(x, kk, pm, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
        sc = silhouette_score(x, res.labels, int(kk.max()), pm, max_block_elements=max_block_elements)
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
    return ClusterSelection(labels=labels, k=k, k_values=k_values, scores=scores)


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
