"""Alternative K selectors and per-segment diagnostics.

* :func:`effective_rank_k`: the *effective rank* of the affinity spectrum (Roy & Vetterli, 2007)
  as an estimate of the number of segments, an alternative to the eigengap elbow of
  Algorithm 1 (``CLASP(k_selector="entropy")``; the K band and silhouette search around it are
  unchanged).
* :func:`background_score`: per-segment feature dispersion, a cue for telling background /
  "stuff" segments from objects (the paper's section 7.1 lists background handling as future
  work; this is a heuristic signal, not a classifier).

Both are pure torch, batched over images and follow the ragged-batch conventions of
:mod:`clasp_torch.spectral` (zero padding + boolean masks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spectral import spectrum_and_counts

__all__ = ["background_score", "effective_rank_k", "spectral_entropy"]


def spectral_entropy(eigenvalues: Tensor, n: Tensor | None = None) -> Tensor:
    """Shannon entropy (nats) of the normalised eigenvalue spectrum.

    ``p_i = max(λ_i, 0) / Σ_j max(λ_j, 0)`` over the ``n_b`` valid entries of each row, and
    ``H = −Σ_i p_i log p_i`` (terms with ``p_i = 0`` contribute 0). A row whose valid entries
    are all ``<= 0`` gets ``H = 0``.

    Args:
        eigenvalues: ``(B, N)`` eigenvalues (any order), padded beyond ``n_b``.
        n: ``(B,)`` number of valid entries per row (default ``N``).

    Returns:
        ``(B,)`` float64 entropy.

    Example:
        >>> spectral_entropy(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).exp()
        tensor([2.], dtype=torch.float64)
    """
    lam, n = spectrum_and_counts(eigenvalues, n)
    N = lam.shape[1]
    valid = torch.arange(N, device=lam.device).unsqueeze(0) < n.unsqueeze(1)
    lam = torch.where(valid, lam.clamp_min(0), torch.zeros_like(lam))
    total = lam.sum(-1, keepdim=True)
    p = lam / total.clamp_min(1e-300)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    h = -plogp.sum(-1)
    return torch.where(total.squeeze(-1) > 0, h, torch.zeros_like(h))


def effective_rank_k(eigenvalues: Tensor, n: Tensor | None = None) -> Tensor:
    """Number of segments from the effective rank of the affinity spectrum.

    ``K = round(exp(H))`` with ``H`` the Shannon entropy of ``p_i = λ_i / Σ λ`` over the ``n_b``
    valid eigenvalues (negative eigenvalues clipped to 0, see :func:`spectral_entropy`),
    clamped to ``[2, n_b − 1]``; images with ``n_b <= 2`` get ``K = n_b`` (the same edge-case
    convention as :func:`clasp_torch.spectral.eigengap_elbow`). ``exp(H)`` equals ``r`` for a
    spectrum with ``r`` equal non-zero eigenvalues and smoothly interpolates otherwise. Rounding
    is ``torch.round`` (half to even).

    Args:
        eigenvalues: ``(B, N)`` eigenvalues, descending, zero padded beyond ``n_b``.
        n: ``(B,)`` number of valid eigenvalues per image (default ``N``).

    Returns:
        ``(B,)`` int64 ``K``.

    Example:
        >>> lam = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        ...                     [8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
        >>> effective_rank_k(lam, torch.tensor([8, 8]))
        tensor([4, 2])
        >>> effective_rank_k(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([2]))
        tensor([2])
    """
    h = spectral_entropy(eigenvalues, n)
    B, N = eigenvalues.shape
    if n is None:
        n = torch.full((B,), N, dtype=torch.long, device=h.device)
    n = n.to(device=h.device, dtype=torch.long)
    k = torch.round(torch.exp(h)).long()
    k = torch.minimum(k.clamp_min(2), (n - 1).clamp_min(2))
    return torch.where(n <= 2, n, k)


def background_score(
    features: Tensor, labels: Tensor, mask: Tensor | None, n_segments: int, *, validate: bool = True
) -> Tensor:
    """Per-segment feature dispersion ``1 − ||mean of unit feature vectors||``.

    For segment ``c`` of image ``b`` with patches ``P`` (``labels == c`` and ``mask``), the
    L2-normalised features ``f̂_p`` give ``μ = mean_p f̂_p`` and the score ``1 − ||μ||``, which
    equals the mean cosine distance of the patches to the segment's mean direction
    ``μ/||μ||``: ``mean_p (1 − cos(f̂_p, μ/||μ||)) = 1 − ||μ||``. It lies in ``[0, 1]``: 0 for
    a segment whose patches all point the same way, larger for heterogeneous segments.

    High dispersion hints at *background / stuff* (large textured or cluttered regions such as
    grass, wall, sky with clouds, crowds) rather than a compact object; the paper leaves
    background handling as future work (section 7.1), and this score is an unsupervised cue for
    it, not a calibrated probability.

    Args:
        features: ``(B, N, D)`` patch features (any scale; zero rows count as zero vectors).
        labels: ``(B, N)`` int segment ids in ``[0, n_segments)``; negative ids are ignored.
        mask: ``(B, N)`` bool, True on real patches, or ``None`` (all real).
        n_segments: number of segment slots ``C``.
        validate: check that every kept label is ``< n_segments`` (one host sync; pass False
            in compiled code whose ids are known to be in range).

    Returns:
        ``(B, C)`` scores in the features' floating dtype (float32 for integer input); NaN
        for segments with no patch.

    Example:
        >>> f = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> background_score(f, torch.tensor([[0, 0, 1, 1]]), None, 3)
        tensor([[0.0000, 0.2929,    nan]])
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, N, D), got {tuple(features.shape)}")
    B, N, _ = features.shape
    if labels.shape != (B, N):
        raise ValueError(f"labels must have shape (B, N) = {(B, N)}, got {tuple(labels.shape)}")
    if n_segments < 0:
        raise ValueError(f"n_segments must be >= 0, got {n_segments}")
    dtype = features.dtype if features.is_floating_point() else torch.float32
    f = features.to(dtype)
    labels = labels.to(device=f.device, dtype=torch.long)
    keep = labels >= 0
    if mask is not None:
        if mask.shape != (B, N):
            raise ValueError(f"mask must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
        keep = keep & mask.to(device=f.device, dtype=torch.bool)
    if validate and keep.any() and int(labels[keep].max()) >= n_segments:
        raise ValueError(f"labels must be < n_segments={n_segments}, found {int(labels[keep].max())}")
    C = int(n_segments)
    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # one extra "dump" slot C collects ignored patches; dropped afterwards
    idx = torch.where(keep, labels, torch.full_like(labels, C))
    onehot = torch.nn.functional.one_hot(idx, C + 1)[..., :C].to(dtype)  # (B, N, C)
    sums = onehot.transpose(1, 2) @ unit  # (B, C, D)
    counts = onehot.sum(1)  # (B, C)
    mean = sums / counts.clamp_min(1).unsqueeze(-1)
    score = (1 - mean.norm(dim=-1)).clamp(0, 1)
    return torch.where(counts > 0, score, torch.full_like(score, float("nan")))
