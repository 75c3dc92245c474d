"""K selection: k-means for every K of each image's band, the best mean silhouette wins."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_floating, check_int, check_integer_tensor, check_shape
from ..spectral import SpectralResult
from . import policy as _policy
from .kmeans import check_kmeans_settings, kmeans_problems
from .silhouette import mean_silhouette, silhouette_problems

__all__ = ["ClusterSelection", "select_k", "best_in_band", "KBandClustering"]


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
    mask, k_lo, k_hi = _check_band(embedding, mask, k_lo, k_hi)
    B, N, M = embedding.shape
    dev = embedding.device
    if max_block_elements is None:
        max_block_elements = _policy.cluster_policy(dev).max_block_elements
    n_init, max_iter, _, seed, tol = check_kmeans_settings(n_init, max_iter, 1, seed, tol)
    if max_problems is not None:
        max_problems = check_int("max_problems", max_problems, 1)
    kmin_all = int(k_lo.min()) if B else 2
    kmax_all = int(k_hi.max()) if B else 1
    labels_out = torch.full((B, N), -1, dtype=torch.long, device=dev)
    labels_out[mask] = 0
    if kmax_all < kmin_all:
        return ClusterSelection(labels_out, torch.ones(B, dtype=torch.long, device=dev),
                                torch.zeros(0, dtype=torch.long, device=dev),
                                torch.zeros(B, 0, dtype=dtype, device=dev),
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
        res = kmeans_problems(emb, mask, bi, dims, kk, n_init, max_iter, tol, seed, 1)
        C = int(kk.max())
        s = silhouette_problems(emb, mask, bi, dims, res.labels, C, max_block_elements)
        sc = mean_silhouette(s, res.labels, C, mask[bi])
        scores[bi, kc_idx[sl]] = sc
        all_labels[sl] = res.labels
    return _choose(scores, all_labels, labels_out, b_idx, kc_idx, k_values, k_lo, k_hi, keep_band)


def _check_band(embedding: Tensor, mask: Tensor, k_lo: Tensor, k_hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validated ``(mask (B, N) bool, k_lo (B,) int64, k_hi (B,) int64)`` of :func:`select_k`."""
    dims = check_shape(embedding, "B N M", "embedding")
    check_floating("embedding", embedding)
    B, dev = dims["B"], embedding.device
    check_shape(mask, "B N", "mask", sizes=dims)
    mask = mask.to(device=dev, dtype=torch.bool)
    n = mask.sum(-1)
    k_lo = check_integer_tensor("k_lo", k_lo, (B,), dev)
    k_hi = check_integer_tensor("k_hi", k_hi, (B,), dev)
    band = k_hi >= k_lo
    if bool((band & (k_lo < 1)).any()):
        raise ValueError(f"k_lo must be >= 1 wherever the band is non-empty, got {k_lo.tolist()}")
    if bool((band & (k_hi > n)).any()):
        raise ValueError(f"k_hi must not exceed the number of real points n = {n.tolist()}, got {k_hi.tolist()}")
    return mask, k_lo, k_hi


def _choose(scores: Tensor, all_labels: Tensor, labels_out: Tensor, b_idx: Tensor, kc_idx: Tensor, k_values: Tensor,
            k_lo: Tensor, k_hi: Tensor, keep_band: bool) -> ClusterSelection:
    """The best K of each image from the silhouettes ``scores (B, Kc)`` of the problems
    ``(b_idx, kc_idx)`` whose labels are ``all_labels (P, N)``; ``labels_out`` holds the
    one-segment labels."""
    B, Kc = scores.shape
    N = labels_out.shape[1]
    P = b_idx.numel()
    dev = scores.device
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
    """Module of :func:`select_k`: k-means + silhouette over each image's K band.

    Args:
        n_init, max_iter, tol, seed, dtype, max_problems, keep_band: see :func:`select_k`.

    Shape:
        - input: ``SpectralResult`` with eigenvectors ``(B, N, M)`` and mask ``(B, N)``,
          ``k_lo``/``k_hi`` ``(B,)``
        - output: :class:`ClusterSelection` with labels ``(B, N)``

    Example:
        >>> from clasp_torch.embedding import spectral_embedding
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.cat([torch.randn(1, 20, 4, generator=g) * 0.1 + torch.eye(4)[i] for i in range(3)], 1)
        >>> e = spectral_embedding(f)
        >>> int(KBandClustering(n_init=3)(e.spectral, e.k_lo, e.k_hi).k[0])
        3
    """

    def __init__(self, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
                 dtype: torch.dtype = torch.float32, max_problems: int | None = None, keep_band: bool = False) -> None:
        super().__init__()
        n_init, max_iter, _, seed, tol = check_kmeans_settings(n_init, max_iter, 1, seed, tol)
        self.n_init, self.max_iter, self.tol, self.seed = n_init, max_iter, tol, seed
        self.dtype = dtype
        self.max_problems = None if max_problems is None else check_int("max_problems", max_problems, 1)
        self.keep_band = bool(keep_band)

    def forward(self, spectral: SpectralResult, k_lo: Tensor, k_hi: Tensor) -> ClusterSelection:
        return select_k(spectral.eigenvectors, spectral.mask, k_lo, k_hi, n_init=self.n_init,
                        max_iter=self.max_iter, tol=self.tol, seed=self.seed, dtype=self.dtype,
                        max_problems=self.max_problems, keep_band=self.keep_band)

    def extra_repr(self) -> str:
        return (f"n_init={self.n_init}, max_iter={self.max_iter}, tol={self.tol}, seed={self.seed}, "
                f"keep_band={self.keep_band}")
