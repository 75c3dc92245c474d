"""The dense CRF on every K of the band: pixel label maps for the K-band hierarchy of proposals.

CLASP's refiner runs the dense CRF on the chosen K only; the other K of the band
(``CLASP(keep_band_labels=True)``) are patch labels, whose nearest-upsampled 16-pixel blocks
rarely follow an object's outline. :func:`refine_band_labels` refines all of them in one batched
CRF call at a small working resolution (:func:`clasp_torch.crf_resolution.crf_refine_labels_bounded`:
downscaled to at most ``max_pixels``, bandwidths scaled alike, bilinear marginals back to the
input size), so their regions get pixel outlines at a fraction of the chosen K's CRF cost
(measured in ``benchmarks/proposals.py``: RESULTS section 11).

Example:
    >>> model = CLASP("efficientnet_lite0", keep_band_labels=True)  # doctest: +SKIP
    >>> out = model(images)  # doctest: +SKIP
    >>> labels, k = refine_band_labels(images, out)  # (B, Kc, H, W), (B, Kc)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .crf_resolution import crf_refine_labels_bounded
from .pipeline import images_to_list, pad_images, upsample_labels

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CLASPOutput, ImagesLike

__all__ = ["DEFAULT_BAND_CRF_PIXELS", "refine_band_labels"]

DEFAULT_BAND_CRF_PIXELS = 2**14
"""Working resolution of the band's CRF (16,384 pixels, e.g. 147 x 111 for a 640 x 480 photo)."""


def refine_band_labels(
    images: ImagesLike, out: CLASPOutput, *, max_pixels: int = DEFAULT_BAND_CRF_PIXELS, max_maps: int | None = None,
    gt_prob: float = 0.8, **crf_params: Any,
) -> tuple[Tensor, Tensor]:
    """Dense-CRF refinement of the patch labels of every K of each image's band.

    Args:
        images: the images ``out`` was computed from (as given to :class:`~clasp_torch.pipeline.CLASP`).
        out: the CLASP output, with ``band_patch_labels`` (``CLASP(keep_band_labels=True)``).
        max_pixels: the CRF's working resolution (see the module docstring).
        max_maps: refine at most this many K per image, evenly spaced over its band (smallest and
            largest K included); the others stay ``-1``. ``None``: every K.
        gt_prob: confidence of the input labels (the pipeline's 0.8).
        **crf_params: more keyword arguments of :func:`clasp_torch.crf.dense_crf`.

    Returns:
        ``labels (B, Kc, H_max, W_max)`` int64 (columns as ``out.k_values``; ``-1`` outside each
        image and for K outside its band), ``k (B, Kc)`` int64 the K of every column.
    """
    if out.band_patch_labels is None:
        raise ValueError("refine_band_labels needs CLASP(..., keep_band_labels=True)")
    band = out.band_patch_labels
    dev = band.device
    B, Kc = band.shape[:2]
    imgs = [im.to(dev) for im in images_to_list(images)]
    imgs = [im if im.dtype == torch.uint8 else (im.float().clamp(0, 1) * 255).round().to(torch.uint8) for im in imgs]
    padded, imask = pad_images(imgs)
    k = out.k_values.to(dev).long().view(1, Kc).expand(B, Kc)
    labels = torch.full((B, Kc) + tuple(out.labels.shape[1:]), -1, dtype=torch.long, device=dev)
    in_band = band.flatten(2).amax(2) >= 0  # (B, Kc) the K of each image's band
    if max_maps is not None:
        in_band = in_band & _evenly_spaced(in_band, max_maps)
    b, j = in_band.nonzero().unbind(1)
    if len(b):
        gs, isz = out.grid_sizes.to(dev)[b], out.image_sizes.to(dev)[b]
        coarse = upsample_labels(band[b, j], gs, isz)
        Hm, Wm = coarse.shape[-2:]
        ref = crf_refine_labels_bounded(padded[b][..., :Hm, :Wm], coarse, k[b, j], gt_prob, imask[b][..., :Hm, :Wm],
                                        max_pixels=max_pixels, **crf_params)
        labels[b, j, :Hm, :Wm] = ref
    return labels, k


def _evenly_spaced(in_band: Tensor, m: int) -> Tensor:
    """``(B, Kc)`` bool: at most ``m`` of each row's True columns, evenly spaced, first and last kept."""
    rank = torch.cumsum(in_band.long(), 1) - 1  # position of every column within its row's band
    n = in_band.sum(1, keepdim=True)
    if m <= 1:
        return rank == 0
    steps = torch.arange(m, device=in_band.device).view(1, 1, m)
    targets = torch.round(steps * (n - 1).clamp_min(0).unsqueeze(2) / (m - 1))
    return (rank.unsqueeze(2) == targets.long()).any(2)
