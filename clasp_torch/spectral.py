"""Spectral stage of CLASP: affinity, eigendecomposition, eigengap elbow and the K band.

Everything here is batched over images. Ragged batches (images with different numbers of
patches) are represented by zero-padded features ``(B, N, D)`` plus a boolean ``mask (B, N)``
that is ``True`` on real patches. Real patches always come first (``mask[b, :n_b]`` is True).

The CLASP affinity is the cosine similarity ``A = F̂ F̂ᵀ`` of the row-normalised patch
features. Because ``A`` has rank at most ``D`` (the feature dimension), its exact spectrum
follows from the ``D x D`` Gram matrix ``G = F̂ᵀ F̂``: ``G = V Λ Vᵀ`` gives the non-zero
eigenvalues ``Λ`` of ``A`` and its eigenvectors ``U = F̂ V Λ^{-1/2}``; all other eigenvalues
of ``A`` are exactly zero. This costs ``O(n D²)`` instead of the ``O(n³)`` of a full ``eigh``.
The full batched ``torch.linalg.eigh`` path is kept for affinities that are not low rank
(clipped cosine, Gaussian kernel, normalised Laplacian), used for ablations.

Numerics: the Gram matrix and its eigendecomposition are computed in float64 (cheap: ``D x D``)
so that eigenvalues agree with a float64 ``numpy.linalg.eigh`` of ``A`` to ~1e-10 relative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .checks import check_bool_mask, check_shape

AffinityKind = Literal["cosine", "cosine_clipped", "gaussian", "laplacian"]
EigenMethod = Literal["auto", "gram", "full"]

__all__ = [
    "SpectralResult",
    "normalize_features",
    "cosine_affinity",
    "affinity_matrix",
    "spectral_decomposition",
    "eigengap_elbow",
    "spectrum_and_counts",
    "k_band",
    "valid_mask",
]


def valid_mask(features: Tensor, mask: Tensor | None) -> Tensor:
    """Return a boolean mask ``(B, N)`` of real rows, checking it when given.

    Args:
        features: ``(B, N, D)`` features.
        mask: ``(B, N)`` boolean or ``None`` (all rows valid).
    """
    dims = check_shape(features, "B N D", "features")
    return check_bool_mask("mask", mask, (dims["B"], dims["N"]), features.device)


def normalize_features(features: Tensor, mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """L2-normalise each feature row; padded rows become exactly zero.

    Args:
        features: ``(B, N, D)`` patch features.
        mask: ``(B, N)`` boolean, True on real rows.
        eps: rows with a smaller norm are left at zero (no NaN).

    Returns:
        ``(B, N, D)`` normalised features ``F̂``.

    Example:
        >>> f = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
        >>> normalize_features(f)
        tensor([[[0.6000, 0.8000],
                 [0.0000, 1.0000]]])
    """
    m = valid_mask(features, mask)
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if not torch.isfinite(features[m]).all():
        raise ValueError("features contain NaN or Inf values; the backbone output is invalid")
    norm = features.norm(dim=-1, keepdim=True)
    out = features / norm.clamp_min(eps)
    # Degenerate scales: the plain norm overflows (huge features) or loses precision to
    # underflow (tiny features). Those rows are rescaled by their largest entry first, so the
    # result is the unit vector of any finite row whatever its scale. Rows of ordinary scale
    # keep the plain formula bit for bit.
    tiny = torch.finfo(features.dtype).tiny
    safe = torch.isfinite(norm) & (norm >= tiny**0.25)
    if not bool(safe[m.unsqueeze(-1)].all()):
        scale = features.abs().amax(-1, keepdim=True)
        fs = features / torch.where(scale > 0, scale, torch.ones_like(scale))
        ns = fs.norm(dim=-1, keepdim=True)
        big = scale * ns  # the true norm (inf when it overflows, which is > eps)
        rescaled = torch.where(big > eps, fs / ns.clamp_min(tiny), torch.zeros_like(fs))
        out = torch.where(safe, out, rescaled)
    # rows with a norm below eps are exactly zero; padded rows are zero whatever they hold
    keep = m.unsqueeze(-1) & ~(norm < eps)
    return torch.where(keep, out, torch.zeros_like(out))


def cosine_affinity(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine affinity ``A = F̂ F̂ᵀ`` (plain matmul, no clipping).

    Args:
        features: ``(B, N, D)``.
        mask: ``(B, N)``; padded rows and columns of ``A`` are zero.

    Returns:
        ``(B, N, N)`` affinity.
    """
    f = normalize_features(features, mask)
    return f @ f.transpose(-1, -2)


def affinity_matrix(
    features: Tensor,
    mask: Tensor | None = None,
    kind: AffinityKind = "cosine",
    sigma: float | None = None,
) -> Tensor:
    """Dense affinity for the full-eigh path (ablations).

    Args:
        features: ``(B, N, D)``.
        mask: ``(B, N)``.
        kind: ``"cosine"`` (CLASP), ``"cosine_clipped"`` (negative entries set to 0),
            ``"gaussian"`` (``exp(-||f̂_i - f̂_j||² / (2 σ²))`` on normalised features; default
            σ = median pairwise distance) or ``"laplacian"`` (``D^-1/2 W D^-1/2`` of the clipped
            cosine affinity W: the eigenvectors with the largest eigenvalues of this matrix are
            those with the smallest eigenvalues of the normalised Laplacian ``I - D^-1/2 W D^-1/2``).

    Returns:
        ``(B, N, N)``; padded rows/columns are zero.
    """
    m = valid_mask(features, mask)
    mm = (m.unsqueeze(-1) & m.unsqueeze(-2)).to(features.dtype)
    a = cosine_affinity(features, m)
    if kind == "cosine":
        return a
    if kind == "cosine_clipped":
        return a.clamp_min(0) * mm
    if kind == "gaussian":
        d2 = (2 - 2 * a).clamp_min(0)
        if sigma is None:
            dist = torch.where(mm.bool(), d2.sqrt(), torch.full_like(d2, float("nan")))
            s = dist.flatten(1).nanmedian(-1).values.clamp_min(1e-6).view(-1, 1, 1)
        else:
            s = torch.as_tensor(float(sigma), dtype=a.dtype, device=a.device)
        return torch.exp(-d2 / (2 * s**2)) * mm
    if kind == "laplacian":
        w = a.clamp_min(0) * mm
        deg = w.sum(-1).clamp_min(1e-12)
        dinv = deg.rsqrt() * m.to(a.dtype)
        return dinv.unsqueeze(-1) * w * dinv.unsqueeze(-2)
    raise ValueError(f"affinity must be one of cosine, cosine_clipped, gaussian, laplacian; got {kind!r}")


@dataclass
class SpectralResult:
    """Eigen-decomposition of a batch of affinities.

    Attributes:
        eigenvalues: ``(B, N)`` eigenvalues of ``A`` in descending order; entries at
            positions ``>= n_b`` are padding (zero).
        eigenvectors: ``(B, N, M)`` eigenvectors (columns) for the first ``M`` eigenvalues;
            rows of padded patches are zero. ``M = min(D, N)`` on the Gram path. Columns for
            eigenvalues that are exactly zero (beyond the rank) are zero vectors on the Gram
            path (the null space has no preferred basis).
        n: ``(B,)`` number of real patches per image.
        mask: ``(B, N)`` boolean mask of real patches.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    n: Tensor
    mask: Tensor


def _gram_eig(f: Tensor, m: Tensor, rank_tol: float) -> tuple[Tensor, Tensor]:
    """Exact spectrum of ``A = f fᵀ`` from the ``D x D`` Gram matrix (float64 inside)."""
    B, N, D = f.shape
    f64 = f.double()
    gram = f64.transpose(-1, -2) @ f64  # (B, D, D)
    mu, v = torch.linalg.eigh(gram)  # ascending
    mu = mu.flip(-1).clamp_min(0)
    v = v.flip(-1)
    keep = mu > rank_tol * mu[:, :1].clamp_min(1e-300)
    inv_sqrt = torch.where(keep, mu.clamp_min(1e-300).rsqrt(), torch.zeros_like(mu))
    u = (f64 @ v) * inv_sqrt.unsqueeze(1)  # (B, N, D)
    mu = torch.where(keep, mu, torch.zeros_like(mu))
    evals = torch.zeros(B, N, dtype=torch.float64, device=f.device)
    k = min(D, N)
    evals[:, :k] = mu[:, :k]
    return evals, u[:, :, :k]


def spectral_decomposition(
    features: Tensor,
    mask: Tensor | None = None,
    *,
    method: EigenMethod = "auto",
    affinity: AffinityKind = "cosine",
    sigma: float | None = None,
    rank_tol: float = 1e-10,
) -> SpectralResult:
    """Eigendecomposition of the CLASP affinity, eigenvalues descending.

    Args:
        features: ``(B, N, D)`` patch features (any scale; they are L2-normalised here).
        mask: ``(B, N)`` boolean, True on real patches (real patches first).
        method: ``"gram"`` (exact, ``O(n D²)``, only for ``affinity="cosine"``), ``"full"``
            (``torch.linalg.eigh`` of the ``(B, N, N)`` affinity) or ``"auto"`` (Gram whenever
            the affinity is the plain cosine and ``D < N``).
        affinity: see :func:`affinity_matrix`.
        sigma: bandwidth for the Gaussian affinity.
        rank_tol: Gram eigenvalues below ``rank_tol * λ_max`` are treated as exact zeros.

    Returns:
        :class:`SpectralResult` with float64 eigenvalues and eigenvectors.

    Example:
        >>> f = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0))
        >>> r = spectral_decomposition(f)
        >>> r.eigenvalues.shape, r.eigenvectors.shape
        (torch.Size([2, 50]), torch.Size([2, 50, 8]))
        >>> bool(torch.allclose(r.eigenvalues.sum(-1), torch.full((2,), 50.0, dtype=torch.float64)))
        True
    """
    m = valid_mask(features, mask)
    B, N, D = features.shape
    if method not in ("auto", "gram", "full"):
        raise ValueError(f"method must be 'auto', 'gram' or 'full', got {method!r}")
    if method == "gram" and affinity != "cosine":
        raise ValueError("method='gram' is exact only for affinity='cosine'; use method='full'")
    n = m.sum(-1)
    use_gram = method == "gram" or (method == "auto" and affinity == "cosine" and D < N)
    if use_gram:
        f = normalize_features(features, m)
        evals, evecs = _gram_eig(f, m, rank_tol)
    else:
        a = affinity_matrix(features.double(), m, affinity, sigma)
        # Padded rows/cols are zero: their eigenvalue 0 would mix with real zero eigenvalues;
        # push them to -inf-like values so they sort last and their vectors stay out of the way.
        pad = (~m).double() * -1e6
        a = a + torch.diag_embed(pad)
        evals, evecs = torch.linalg.eigh(a)
        evals = evals.flip(-1)
        evecs = evecs.flip(-1) * m.unsqueeze(-1).double()
        evals = torch.where(torch.arange(N, device=m.device).unsqueeze(0) < n.unsqueeze(1), evals, 0.0)
        if affinity == "cosine":
            # As on the Gram path: eigenvalues below rank_tol * λ_max are exact zeros and their
            # eigenvectors (an arbitrary basis of the null space, e.g. for duplicate feature
            # rows) are zero columns, so both paths give the same embedding.
            null = evals.abs() <= rank_tol * evals[:, :1].abs()
            evals = evals.masked_fill(null, 0.0)
            evecs = evecs.masked_fill(null.unsqueeze(1), 0.0)
    return SpectralResult(eigenvalues=evals, eigenvectors=evecs, n=n, mask=m)


def spectrum_and_counts(eigenvalues: Tensor, n: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Check a padded batch of spectra; return it in float64 with its valid counts.

    Args:
        eigenvalues: ``(B, N)``; n: ``(B,)`` valid entries per row (default ``N``).

    Returns:
        ``(eigenvalues (B, N) float64, n (B,) int64)`` on the eigenvalues' device.
    """
    if eigenvalues.dim() != 2:
        raise ValueError(f"eigenvalues must have shape (B, N), got {tuple(eigenvalues.shape)}")
    B, N = eigenvalues.shape
    lam = eigenvalues.double()
    if n is None:
        n = torch.full((B,), N, dtype=torch.long, device=lam.device)
    n = torch.as_tensor(n, device=lam.device).long()
    if n.shape != (B,):
        raise ValueError(f"n must have shape (B,) = {(B,)}, got {tuple(n.shape)}")
    return lam, n


def eigengap_elbow(eigenvalues: Tensor, n: Tensor | None = None) -> Tensor:
    """Eigengap elbow of Algorithm 1, vectorised over the batch.

    For each image with eigenvalues ``λ_1 ≥ … ≥ λ_n``: points ``(i, λ_i − λ_{i+1})`` for
    ``i = 1..n−1``; the straight line from the first point to the last;
    ``i* = argmax`` of the perpendicular distance to that line (first maximum);
    ``K_opt = i* + 1``.

    Args:
        eigenvalues: ``(B, N)`` descending, padded beyond ``n_b``.
        n: ``(B,)`` number of valid eigenvalues per image (default ``N``).

    Returns:
        ``(B,)`` int64 ``K_opt``. Images with ``n <= 2`` get ``K_opt = n`` (at most 2).

    Example:
        >>> lam = torch.tensor([[10.0, 4.0, 3.5, 3.2, 3.0, 2.9]])
        >>> eigengap_elbow(lam)
        tensor([3])
    """
    lam, n = spectrum_and_counts(eigenvalues, n)
    N = lam.shape[1]
    if N < 2:
        return n.clamp(max=1).clone()
    gaps = lam[:, :-1] - lam[:, 1:]  # (B, N-1): gap i (1-based) at index i-1
    m = n - 1  # number of points
    idx = torch.arange(N - 1, device=lam.device).unsqueeze(0)
    valid = idx < m.unsqueeze(1)
    x = (idx + 1).double()
    last = (m - 1).clamp_min(0)
    y1 = gaps[:, :1]
    ym = gaps.gather(1, last.unsqueeze(1))
    x1 = torch.ones_like(y1)
    xm = m.double().unsqueeze(1)
    dx, dy = xm - x1, ym - y1
    num = (dx * (y1 - gaps) - (x1 - x) * dy).abs()
    den = torch.sqrt(dx**2 + dy**2)
    dist = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    dist = torch.where(valid, dist, torch.full_like(dist, -1.0))
    i_star = dist.argmax(-1) + 1
    k_opt = i_star + 1
    return torch.where(n <= 2, n.clamp(max=2), k_opt)


def k_band(k_opt: Tensor, n: Tensor, beta: float = 0.5, k_min: int = 2) -> tuple[Tensor, Tensor]:
    """The K band of Algorithm 1: ``[floor(K_opt(1−β)), ceil(K_opt(1+β))]``, K < 2 skipped.

    The band is also capped at ``n − 1`` (the silhouette needs at most ``n − 1`` clusters).

    Args:
        k_opt: ``(B,)`` elbow estimate.
        n: ``(B,)`` number of patches.
        beta: band half-width, in (0, 1).
        k_min: smallest K considered (2).

    Returns:
        ``(k_lo, k_hi)``, each ``(B,)`` int64, inclusive. ``k_hi < k_lo`` marks an empty
        band (fewer than 3 patches): such an image is a single segment.

    Example:
        >>> k_band(torch.tensor([6, 2, 3]), torch.tensor([100, 100, 100]))
        (tensor([3, 2, 2]), tensor([9, 3, 5]))
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ValueError(f"k_min must be an integer >= 1, got {k_min!r}")
    k_opt = k_opt if isinstance(k_opt, Tensor) else torch.as_tensor(k_opt, device="cpu")
    n = torch.as_tensor(n, device=k_opt.device)
    if k_opt.dim() != 1 or n.shape != k_opt.shape:
        raise ValueError(f"k_opt and n must both have shape (B,), got {tuple(k_opt.shape)} and {tuple(n.shape)}")
    kf = k_opt.double()
    # Rounded to 9 decimals first so that e.g. 6 * 1.5 is not ceil'd up by float noise.
    lo = torch.floor(torch.round(kf * (1 - beta), decimals=9)).long().clamp_min(k_min)
    hi = torch.ceil(torch.round(kf * (1 + beta), decimals=9)).long()
    hi = torch.minimum(hi, n.to(hi.device).long() - 1)
    return lo, hi
