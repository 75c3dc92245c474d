"""The spectral stage of :class:`~clasp_torch.CLASP` as one step: features → spectrum → K_opt →
the K band of each image, with the rules for degenerate images.

:func:`spectral_embedding` is the functional core, :class:`SpectralEmbedding` its Module. The
maths lives in :mod:`clasp_torch.spectral` (affinity, eigendecomposition, elbow, band) and
:mod:`clasp_torch.selectors` (the entropy selector); this module decides, per image, which band
the clustering stage searches:

* the paper's band ``[⌊K_opt(1−β)⌋, ⌈K_opt(1+β)⌉]`` (or ``fixed_k``), capped by the number of
  distinct feature rows (more clusters would split identical points by float noise) and by
  ``n − 1`` (the silhouette needs ``K <= n − 1``);
* an empty band (one segment, ``k_opt = 1``) for images flagged ``single_segment`` and for images
  whose normalised feature rows all point the same way (an affinity of numerical rank < 2 with
  no opposite rows: constant features, all-zero features, a single patch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .checks import check_bool_mask, check_choice, check_float, check_int, check_shape
from .spectral import (
    AffinityKind,
    EigenMethod,
    SpectralResult,
    eigengap_elbow,
    k_band,
    normalize_features,
    spectral_decomposition,
)

__all__ = [
    "KSelector",
    "EmbeddingResult",
    "spectral_embedding",
    "SpectralEmbedding",
    "count_distinct_rows",
    "single_direction",
    "RANK_TOL",
]

KSelector = Literal["eigengap", "entropy"]

#: affinity eigenvalues below this fraction of the largest are numerically zero (the Gram path's
#: default rank tolerance)
RANK_TOL = 1e-10


@dataclass
class EmbeddingResult:
    """Output of the spectral stage for ``B`` images of up to ``N`` patches.

    Attributes:
        spectral: the :class:`~clasp_torch.spectral.SpectralResult` (eigenvalues ``(B, N)``,
            eigenvectors ``(B, N, M)``, mask ``(B, N)``, n ``(B,)``).
        k_opt: ``(B,)`` the selector's estimate (``1`` for one-segment images).
        k_lo, k_hi: ``(B,)`` the inclusive K band (``k_hi < k_lo``: one segment).
        single: ``(B,)`` True on images that are one segment.
    """

    spectral: SpectralResult
    k_opt: Tensor
    k_lo: Tensor
    k_hi: Tensor
    single: Tensor


def count_distinct_rows(features: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` number of distinct normalised feature rows among the real ones.

    Rows are compared after L2 normalisation and rounding to ``2**-20`` (so rows that differ
    only by float noise count once), through a 64-bit hash of each row and one sort.

    Args:
        features: ``(B, N, D)``; mask ``(B, N)`` True on real rows.

    Example:
        >>> f = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
        >>> count_distinct_rows(f, torch.ones(1, 3, dtype=torch.bool))
        tensor([2])
    """
    B, N, D = features.shape
    q = torch.round(normalize_features(features, mask).double() * 2**20).long()
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    w = torch.randint(1, 2**31 - 1, (D,), generator=g, dtype=torch.long, device="cpu").to(features.device)
    h = (q * w).sum(-1)  # int64 arithmetic wraps: a hash
    h = h.masked_fill(~mask, torch.iinfo(torch.long).max).sort(-1).values
    n = mask.sum(-1)
    pos = torch.arange(1, N, device=features.device).view(1, -1)
    change = (h[:, 1:] != h[:, :-1]) & (pos < n.view(-1, 1))
    return (1 + change.sum(-1)).minimum(n)


def single_direction(eigenvalues: Tensor, eigenvectors: Tensor, n: Tensor) -> Tensor:
    """``(B,)`` True where every normalised feature row points the same way (or is zero).

    That is the cosine affinity has numerical rank <= 1 and its leading eigenvector has no
    entries of opposite signs (rank 1 with opposite rows, ``f`` and ``-f``, is two segments).

    Args:
        eigenvalues: ``(B, N)`` descending; eigenvectors ``(B, N, M)``; n ``(B,)`` real rows.
    """
    B, N = eigenvalues.shape
    lam = eigenvalues.double()
    lam1 = lam[:, 0].abs()
    lam2 = lam[:, 1].abs() if N > 1 else torch.zeros_like(lam1)
    rank_le1 = (lam2 <= RANK_TOL * lam1) | (n <= 1)
    if eigenvectors.shape[-1] == 0:
        return rank_le1
    u1 = eigenvectors[..., 0].double()
    tol = 1e-6 * u1.abs().amax(-1, keepdim=True)
    same_sign = ~((u1 > tol).any(-1) & (u1 < -tol).any(-1))
    return rank_le1 & same_sign


def spectral_embedding(
    features: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    method: EigenMethod = "auto",
    affinity: AffinityKind = "cosine",
    k_selector: KSelector = "eigengap",
    fixed_k: int | None = None,
    single_segment: Tensor | None = None,
) -> EmbeddingResult:
    """Spectrum, K_opt and K band of each image (see the module docstring for the rules).

    Args:
        features: ``(B, N, D)`` float features, zero padded, real rows first.
        mask: ``(B, N)`` True on real rows (default all).
        beta: half-width of the band around ``K_opt``, in ``(0, 1)``.
        method: ``"auto"`` takes the exact Gram path for the cosine affinity whatever the padded
            ``N`` of the batch (so that an image's result never depends on its batch), else
            :func:`~clasp_torch.spectral.spectral_decomposition`'s choice; ``"gram"``/``"full"``.
        affinity: see :func:`~clasp_torch.spectral.affinity_matrix`.
        k_selector: ``"eigengap"`` (the paper's elbow) or ``"entropy"`` (effective rank).
        fixed_k: search this K only (capped as the band) instead of the band.
        single_segment: optional ``(B,)`` bool, force these images to one segment.

    Returns:
        :class:`EmbeddingResult`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.cat([torch.randn(1, 20, 4, generator=g) * 0.1 + torch.eye(4)[i] for i in range(3)], 1)
        >>> r = spectral_embedding(f)
        >>> int(r.k_opt[0]), (int(r.k_lo[0]), int(r.k_hi[0]))
        (4, (2, 6))
    """
    dims = check_shape(features, "B N D", "features")
    B, N = dims["B"], dims["N"]
    mask = check_bool_mask("mask", mask, (B, N), features.device)
    beta = check_float("beta", beta, minimum=0.0, maximum=1.0, open_interval=True)
    check_choice("k_selector", k_selector, ("eigengap", "entropy"))
    if fixed_k is not None:
        fixed_k = check_int("fixed_k", fixed_k, 2)
    if method == "auto" and affinity == "cosine":
        method = "gram"  # spectral_decomposition's own "auto" switches path on the padded N
    spec = spectral_decomposition(features, mask, method=method, affinity=affinity)
    if k_selector == "entropy":
        from .selectors import effective_rank_k

        k_opt = effective_rank_k(spec.eigenvalues, spec.n)
    else:
        k_opt = eigengap_elbow(spec.eigenvalues, spec.n)
    n_distinct = count_distinct_rows(features, mask)
    if fixed_k is not None:
        kf = torch.full_like(k_opt, fixed_k)
        lo = torch.minimum(kf, n_distinct.clamp_min(2))
        hi = torch.minimum(torch.minimum(kf, spec.n - 1), n_distinct)
    else:
        lo, hi = k_band(k_opt, spec.n, beta)
        hi = torch.minimum(hi, n_distinct)
    single = single_direction(spec.eigenvalues, spec.eigenvectors, spec.n)
    if single_segment is not None:
        flagged = single_segment if isinstance(single_segment, Tensor) else torch.as_tensor(
            single_segment, device=features.device)
        single = single | check_bool_mask("single_segment", flagged, (B,), features.device)
    k_opt = torch.where(single, torch.ones_like(k_opt), k_opt)
    hi = torch.where(single, lo - 1, hi)  # an empty band: the clustering stage returns one segment
    return EmbeddingResult(spectral=spec, k_opt=k_opt, k_lo=lo, k_hi=hi, single=single)


class SpectralEmbedding(nn.Module):
    """Module of :func:`spectral_embedding`: features → spectrum, K_opt, K band.

    Args:
        beta, method, affinity, k_selector, fixed_k: see :func:`spectral_embedding`.

    Shape:
        - features: ``(B, N, D)``, mask ``(B, N)``, single_segment ``(B,)``
        - output: :class:`EmbeddingResult`

    Example:
        >>> stage = SpectralEmbedding(beta=0.5)
        >>> out = stage(torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0)))
        >>> out.k_lo.shape, out.spectral.eigenvectors.shape[:2]
        (torch.Size([2]), torch.Size([2, 30]))
    """

    def __init__(
        self,
        beta: float = 0.5,
        method: EigenMethod = "auto",
        affinity: AffinityKind = "cosine",
        k_selector: KSelector = "eigengap",
        fixed_k: int | None = None,
    ) -> None:
        super().__init__()
        self.beta = check_float("beta", beta, minimum=0.0, maximum=1.0, open_interval=True)
        self.method: EigenMethod = check_choice("method", method, ("auto", "gram", "full"))  # type: ignore[assignment]
        self.affinity: AffinityKind = check_choice(  # type: ignore[assignment]
            "affinity", affinity, ("cosine", "cosine_clipped", "gaussian", "laplacian"))
        self.k_selector: KSelector = check_choice("k_selector", k_selector, ("eigengap", "entropy"))  # type: ignore
        self.fixed_k = None if fixed_k is None else check_int("fixed_k", fixed_k, 2)

    def forward(self, features: Tensor, mask: Tensor | None = None,
                single_segment: Tensor | None = None) -> EmbeddingResult:
        return spectral_embedding(features, mask, beta=self.beta, method=self.method, affinity=self.affinity,
                                  k_selector=self.k_selector, fixed_k=self.fixed_k, single_segment=single_segment)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, method={self.method!r}, affinity={self.affinity!r}, "
                f"k_selector={self.k_selector!r}, fixed_k={self.fixed_k}")
