"""Feature smoothing on the patch grid, between the backbone and the affinity.

Backbone patch features are noisy from one patch to the next; averaging each feature with its
neighbours on the patch grid before the cosine affinity gives the spectral clustering smoother,
more compact segments. The smoothing acts on the raw features ``F`` (before the row
normalisation of :mod:`clasp_torch.spectral`), so the affinity stays ``A = F̂ F̂ᵀ`` of rank
``<= D`` and the exact Gram path is unchanged.

Kinds (all through :mod:`kornia.filters`, never re-implemented here):

* ``"none"``: identity (the paper's pipeline).
* ``"gaussian"``: :func:`kornia.filters.gaussian_blur2d`, standard deviation ``sigma`` patches,
  kernel radius ``int(truncate * sigma + 0.5)`` (scipy's rule for ``gaussian_filter``).
* ``"bilateral"``: :func:`kornia.filters.joint_bilateral_blur` guided by the image
  area-resized to the patch grid (``guide``): spatial ``sigma`` as above, colour
  ``sigma_color`` (L1 RGB distance in [0, 1] units).
* ``"guided"``: :func:`kornia.filters.guided_blur` (He et al.'s guided filter) with the same
  guide, box window radius ``max(1, int(sqrt(3) * sigma + 0.5))`` (a box of half-width
  ``sqrt(3) sigma`` has standard deviation ``sigma``) and regulariser ``eps`` (squared guide units).

Ragged batches are exact: each image is filtered within its own patch grid, with its border
patches replicated outwards (scipy's ``mode="nearest"``), exactly as if it were alone. For the
single-pass filters (gaussian, bilateral) each image's padding is first filled with its own
replicated border by index gathering and the whole batch is filtered in one call; the guided
filter box-filters twice (window statistics, then the coefficients), so it runs per group of
equal grid size on the cropped grids. Padding is zero on output. Everything is differentiable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from kornia.filters import gaussian_blur2d, guided_blur, joint_bilateral_blur
from torch import Tensor, nn

__all__ = [
    "SmoothingKind",
    "SMOOTHING_KINDS",
    "GUIDED_KINDS",
    "gaussian_radius",
    "box_radius",
    "grid_sizes_from_mask",
    "replicate_fill",
    "smooth_features",
    "FeatureSmoothing",
]

SmoothingKind = Literal["none", "gaussian", "bilateral", "guided"]
SMOOTHING_KINDS: tuple[str, ...] = ("none", "gaussian", "bilateral", "guided")
GUIDED_KINDS: tuple[str, ...] = ("bilateral", "guided")
"""Kinds that need the image guide (``needs_guide``)."""


def gaussian_radius(sigma: float, truncate: float = 3.0) -> int:
    """Kernel radius of the Gaussian (and bilateral spatial) kernel: ``int(truncate * sigma + 0.5)``,
    the rule of ``scipy.ndimage.gaussian_filter``; the kernel size is ``2 * radius + 1``.

    Example:
        >>> gaussian_radius(1.0), gaussian_radius(0.5), gaussian_radius(2.0)
        (3, 2, 6)
    """
    return int(truncate * float(sigma) + 0.5)


def box_radius(sigma: float) -> int:
    """Window radius of the guided filter for ``sigma``: ``max(1, int(sqrt(3) * sigma + 0.5))``."""
    return max(1, int(math.sqrt(3.0) * float(sigma) + 0.5))


def grid_sizes_from_mask(patch_mask: Tensor) -> Tensor:
    """``(B, 2)`` int64 ``(h_b, w_b)`` of each image's top-left rectangle of real patches.

    Args:
        patch_mask: ``(B, h_max, w_max)`` boolean, True on real patches; each image's real
            patches must be the rectangle ``[:h_b, :w_b]`` (the pipeline's layout).

    Raises:
        ValueError: a mask that is not such a rectangle, or an image without patches.
    """
    m = patch_mask.bool()
    B, hm, wm = m.shape
    h = m.any(2).sum(1)
    w = m.any(1).sum(1)
    rows = torch.arange(hm, device=m.device).view(1, hm, 1) < h.view(B, 1, 1)
    cols = torch.arange(wm, device=m.device).view(1, 1, wm) < w.view(B, 1, 1)
    if B and (bool((h == 0).any()) or not torch.equal(rows & cols, m)):
        raise ValueError("patch_mask: each image's real patches must be a non-empty top-left rectangle [:h, :w]")
    return torch.stack([h, w], 1)


def replicate_fill(x: Tensor, grid_sizes: Tensor) -> Tensor:
    """Fill each image's padding with its own border values (nearest real patch), by gathering.

    Position ``(y, x)`` of image ``b`` takes the value at ``(min(y, h_b - 1), min(x, w_b - 1))``,
    so a filter with ``border_type="replicate"`` over the filled batch sees, for every image,
    exactly its own grid extended by border replication.

    Args:
        x: ``(B, C, h_max, w_max)``.
        grid_sizes: ``(B, 2)`` ``(h_b, w_b)``.

    Returns:
        ``(B, C, h_max, w_max)``, equal to ``x`` on each image's grid.

    Example:
        >>> x = torch.arange(6.0).view(1, 1, 2, 3)
        >>> replicate_fill(x, torch.tensor([[1, 2]]))
        tensor([[[[0., 1., 1.],
                  [0., 1., 1.]]]])
    """
    B, C, hm, wm = x.shape
    g = grid_sizes.to(x.device)
    ry = torch.minimum(torch.arange(hm, device=x.device).view(1, hm), g[:, :1] - 1)  # (B, hm)
    rx = torch.minimum(torch.arange(wm, device=x.device).view(1, wm), g[:, 1:] - 1)  # (B, wm)
    x = x.gather(2, ry.view(B, 1, hm, 1).expand(B, C, hm, wm))
    return x.gather(3, rx.view(B, 1, 1, wm).expand(B, C, hm, wm))


def _check_args(features: Tensor, patch_mask: Tensor, kind: str, sigma: float, guide: Tensor | None) -> None:
    if kind not in SMOOTHING_KINDS:
        raise ValueError(f"kind must be one of {SMOOTHING_KINDS}, got {kind!r}")
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor (B, h, w, D), got {features.dtype} {tuple(features.shape)}")
    if tuple(patch_mask.shape) != tuple(features.shape[:3]):
        raise ValueError(f"patch_mask must have shape (B, h, w) = {tuple(features.shape[:3])}, "
                         f"got {tuple(patch_mask.shape)}")
    if kind == "none":
        return
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
        raise ValueError(f"sigma must be a positive number (in patches), got {sigma!r}")
    if kind in GUIDED_KINDS:
        if guide is None:
            raise ValueError(f"kind={kind!r} needs the image guide (B, C, h, w); got None")
        B, h, w, _ = features.shape
        if guide.dim() != 4 or guide.shape[0] != B or tuple(guide.shape[-2:]) != (h, w):
            raise ValueError(f"guide must have shape (B, C, h, w) = ({B}, C, {h}, {w}), got {tuple(guide.shape)}")


def smooth_features(
    features: Tensor,
    patch_mask: Tensor,
    kind: SmoothingKind = "gaussian",
    sigma: float = 1.0,
    guide: Tensor | None = None,
    *,
    truncate: float = 3.0,
    sigma_color: float = 0.1,
    eps: float = 0.01,
) -> Tensor:
    """Smooth patch features on each image's own grid (see the module docstring for the kinds).

    Args:
        features: ``(B, h_max, w_max, D)`` float patch features (zero padded).
        patch_mask: ``(B, h_max, w_max)`` boolean, True on real patches (top-left rectangles).
        kind: ``"none"``, ``"gaussian"``, ``"bilateral"`` or ``"guided"``.
        sigma: spatial scale in patches (> 0; ignored by ``"none"``).
        guide: ``(B, C, h_max, w_max)`` float guide image (e.g. RGB in [0, 1],
            :func:`clasp_torch.pipeline.patch_guides`), needed by ``"bilateral"`` and ``"guided"``;
            its padding is never read.
        truncate: Gaussian kernel radius in units of ``sigma`` (:func:`gaussian_radius`).
        sigma_color: bilateral colour scale (L1 distance of guide values).
        eps: guided-filter regulariser (added to the guide's local variance).

    Returns:
        ``(B, h_max, w_max, D)`` smoothed features, same dtype, zero on padding (``"none"``
        returns ``features`` itself).

    Example:
        >>> f = torch.zeros(2, 4, 5, 3); f[:, :, 2:] = 1.0
        >>> m = torch.ones(2, 4, 5, dtype=torch.bool); m[1, 3:] = False; m[1, :, 4:] = False
        >>> out = smooth_features(f, m, "gaussian", sigma=1.0)
        >>> out.shape, bool(out[1, 3:].abs().sum() == 0)
        (torch.Size([2, 4, 5, 3]), True)
        >>> round(float(out[0, 0, 2, 0]), 4)  # a step edge, blurred
        0.6995
    """
    _check_args(features, patch_mask, kind, sigma, guide)
    if kind == "none":
        return features
    grids = grid_sizes_from_mask(patch_mask)
    x = features.permute(0, 3, 1, 2)  # (B, D, h, w)
    g = None if guide is None else guide.to(device=x.device, dtype=x.dtype)
    if kind == "guided":
        assert g is not None
        k = 2 * box_radius(sigma) + 1
        out = torch.zeros_like(x)
        sizes: dict[tuple[int, int], list[int]] = {}
        for b, (h, w) in enumerate(grids.tolist()):
            sizes.setdefault((h, w), []).append(b)
        for (h, w), idx in sizes.items():  # one call per grid size, on the cropped grids
            sel = torch.tensor(idx, device=x.device)
            y = guided_blur(g[sel, :, :h, :w], x[sel, :, :h, :w], k, eps, border_type="replicate")
            out[sel, :, :h, :w] = y
    else:
        k = 2 * gaussian_radius(sigma, truncate) + 1
        xf = replicate_fill(x, grids)
        if kind == "gaussian":
            out = gaussian_blur2d(xf, k, (float(sigma), float(sigma)), border_type="replicate")
        else:
            assert g is not None
            out = joint_bilateral_blur(xf, replicate_fill(g, grids), k, sigma_color, (float(sigma), float(sigma)),
                                       border_type="replicate")
    out = out * patch_mask.to(device=x.device, dtype=x.dtype).unsqueeze(1)
    return out.permute(0, 2, 3, 1)


class FeatureSmoothing(nn.Module):
    """Feature smoothing as a pipeline stage: ``CLASP(smoothing=FeatureSmoothing("gaussian", 1.0))``.

    ``forward(features (B, h, w, D), patch_mask (B, h, w), guide (B, C, h, w) | None) -> (B, h, w, D)``
    (:func:`smooth_features`). ``needs_guide`` is True for the edge-aware kinds (``"bilateral"``,
    ``"guided"``), which tells :class:`~clasp_torch.CLASP` to pass the images area-resized to
    their patch grids as ``guide``.

    Example:
        >>> sm = FeatureSmoothing("bilateral", sigma=1.0, sigma_color=0.1)
        >>> sm.needs_guide
        True
        >>> f, m = torch.rand(1, 3, 4, 8), torch.ones(1, 3, 4, dtype=torch.bool)
        >>> sm(f, m, torch.rand(1, 3, 3, 4)).shape
        torch.Size([1, 3, 4, 8])
    """

    def __init__(self, kind: SmoothingKind = "gaussian", sigma: float = 1.0, *, truncate: float = 3.0,
                 sigma_color: float = 0.1, eps: float = 0.01) -> None:
        super().__init__()
        if kind not in SMOOTHING_KINDS:
            raise ValueError(f"kind must be one of {SMOOTHING_KINDS}, got {kind!r}")
        if kind != "none" and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
            raise ValueError(f"sigma must be a positive number (in patches), got {sigma!r}")
        self.kind: SmoothingKind = kind
        self.sigma, self.truncate, self.sigma_color, self.eps = float(sigma), float(truncate), sigma_color, eps
        self.needs_guide: bool = kind in GUIDED_KINDS

    def forward(self, features: Tensor, patch_mask: Tensor, guide: Tensor | None = None) -> Tensor:
        return smooth_features(features, patch_mask, self.kind, self.sigma, guide, truncate=self.truncate,
                               sigma_color=self.sigma_color, eps=self.eps)

    def extra_repr(self) -> str:
        s = f"kind={self.kind!r}, sigma={self.sigma}"
        if self.kind == "bilateral":
            s += f", sigma_color={self.sigma_color}"
        if self.kind == "guided":
            s += f", eps={self.eps}"
        return s
