"""Resampling of images, label maps and CRF marginals at bounded memory (the CRF's working
resolution, :mod:`clasp_torch.crf_resolution`).

Every function writes full-size results in row chunks of at most ``CHUNK_ELEMENTS`` elements, so no
full-size float buffer of a large photo is ever held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .crf.meanfield import argmax_labels

__all__ = ["CHUNK_ELEMENTS", "resize_image", "downscale_labels", "upsample_labels_nearest", "upsample_marginals_argmax"]

#: full-size temporaries of the bring-back: at most this many elements
CHUNK_ELEMENTS = 1 << 22


def resize_image(image: Tensor, size: tuple[int, int], band_rows: int = 256) -> Tensor:
    """Antialiased bilinear resize of an RGB image to ``size``, in bands of rows.

    Same values as ``F.interpolate(image.float()[None], size, mode="bilinear", antialias=True)``
    (its filter is separable: each band of input rows is resized along x alone, then the
    ``(3, H, w)`` result along y), rounded to uint8, without a full-size float copy.

    Args:
        image: ``(3, H, W)`` uint8 or float in ``[0, 255]``.
        size: ``(h, w)``.
        band_rows: input rows converted to float at a time.

    Returns:
        ``(3, h, w)`` uint8.
    """
    if image.dim() != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    H, W = int(image.shape[-2]), int(image.shape[-1])
    h, w = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return image if image.dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.uint8)

    def resample(x: Tensor, hw: tuple[int, int]) -> Tensor:
        return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]

    if w != W:
        x = torch.empty(3, H, w, dtype=torch.float32, device=image.device)
        for y in range(0, H, band_rows):
            x[:, y : y + band_rows] = resample(image[:, y : y + band_rows].float(), (min(band_rows, H - y), w))
    else:
        x = image.float()
    if h != H:
        x = resample(x, (h, w))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _centre_index(n_out: int, n_in: int, device: torch.device) -> Tensor:
    """``(n_out,)`` int64 input index of each output pixel's centre: ``floor((i + 0.5) n_in / n_out)``."""
    i = torch.arange(n_out, device=device, dtype=torch.float64)
    return torch.floor((i + 0.5) * (n_in / n_out)).long().clamp_(0, n_in - 1)


def downscale_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest downscaling of a label map: each output pixel takes the label under its centre.

    Args:
        labels: ``(H, W)`` integer labels.
        size: ``(h, w)``.

    Returns:
        ``(h, w)`` labels of the same dtype.
    """
    H, W = int(labels.shape[-2]), int(labels.shape[-1])
    h, w = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return labels
    dev = labels.device
    return labels.index_select(0, _centre_index(h, H, dev)).index_select(1, _centre_index(w, W, dev))


def _row_chunks(n_rows: int, row_elements: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [(y, min(y + step, n_rows)) for y in range(0, n_rows, step)]


def _output(out: Tensor | None, size: tuple[int, int], device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(size, dtype=torch.long, device=device)
    if tuple(out.shape) != tuple(size):
        raise ValueError(f"out must have shape {tuple(size)}, got {tuple(out.shape)}")
    return out


def upsample_labels_nearest(labels: Tensor, size: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """Nearest upsampling of a label map (the label under each output pixel's centre).

    Args:
        labels: ``(h, w)`` integer labels.
        size: ``(H, W)``.
        out: optional ``(H, W)`` int64 tensor (e.g. a view into a padded batch) written in place.

    Returns:
        ``(H, W)`` int64 (``out`` when given); temporaries are row chunks.
    """
    h, w = int(labels.shape[-2]), int(labels.shape[-1])
    H, W = int(size[0]), int(size[1])
    res = _output(out, (H, W), labels.device)
    ry, rx = _centre_index(H, h, labels.device), _centre_index(W, w, labels.device)
    wide = labels.long().index_select(1, rx)  # (h, W): each source row widened once
    for y0, y1 in _row_chunks(H, W):
        _take_rows(wide, ry[y0:y1], res[y0:y1])
    return res


def _take_rows(src: Tensor, rows: Tensor, dst: Tensor) -> None:
    """``dst[:] = src[rows]`` (row copies), without a temporary when ``dst`` is contiguous."""
    if dst.is_contiguous():
        torch.index_select(src, 0, rows, out=dst)
    else:
        dst.copy_(src.index_select(0, rows))


def _bilinear_taps(n_out: int, n_in: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis:
    ``(i0, i1, lam)``, output ``o`` = ``(1 - lam) in[i0] + lam in[i1]`` (float32 weights)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min_(0)
    i0 = src.long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    lam = (src - i0.float()).clamp_(0, 1)
    return i0, i1, lam


def upsample_marginals_argmax(Q: Tensor, size: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """``argmax_c`` of the bilinearly upsampled marginals, without the full-size ``(C, H, W)`` array.

    The value is that of ``F.interpolate(Q[None], size, mode="bilinear").argmax(1)``: where the
    four source pixels of an output pixel share one argmax ``c`` (a convex combination of
    vectors maximal at ``c`` is maximal at ``c``), the output is ``c``; only output pixels between
    source pixels of different labels (near segment edges) blend the ``C`` marginals.

    Args:
        Q: ``(C, h, w)`` float marginals.
        size: ``(H, W)``.
        out: optional ``(H, W)`` int64 tensor written in place.

    Returns:
        ``(H, W)`` int64 labels (``out`` when given).
    """
    C, h, w = (int(s) for s in Q.shape)
    H, W = int(size[0]), int(size[1])
    dev = Q.device
    res = _output(out, (H, W), dev)
    lab = argmax_labels(Q.unsqueeze(0))[0]  # (h, w)
    if (h, w) == (H, W):
        res.copy_(lab)
        return res
    y0, y1, ly = _bilinear_taps(H, h, dev)
    x0, x1, lx = _bilinear_taps(W, w, dev)
    # mixed[i, j]: the cell spanned by source rows (i, i+1) and columns (j, j+1) has 2+ labels
    yn = (torch.arange(h, device=dev) + 1).clamp_(max=h - 1)
    xn = (torch.arange(w, device=dev) + 1).clamp_(max=w - 1)
    lab_y = lab.index_select(0, yn)
    mixed = (lab != lab.index_select(1, xn)) | (lab != lab_y) | (lab != lab_y.index_select(1, xn))
    del lab_y
    wide, mixed = lab.index_select(1, x0), mixed.index_select(1, x0)  # (h, W): source rows widened once
    Qf = Q.float()
    for r0, r1 in _row_chunks(H, W):
        ry0, ry1 = y0[r0:r1], y1[r0:r1]
        block = res[r0:r1]
        _take_rows(wide, ry0, block)
        edge = mixed.index_select(0, ry0).nonzero()  # (n, 2) output pixels between labels
        if edge.numel() == 0:
            continue
        r, c = edge[:, 0], edge[:, 1]
        # along x first (as F.interpolate), on the chunk's source rows s0..s1, then along y
        s0, s1 = int(ry0[0]), int(ry1[-1]) + 1
        rows = Qf[:, s0:s1]
        lxv = lx.view(1, 1, W)
        hor = (rows.index_select(2, x0) * (1 - lxv) + rows.index_select(2, x1) * lxv).reshape(C, -1)
        wy = ly[r0:r1][r]
        top = hor.index_select(1, (ry0[r] - s0) * W + c)
        bot = hor.index_select(1, (ry1[r] - s0) * W + c)
        block[r, c] = _first_argmax(top * (1 - wy) + bot * wy)
    return res


def _first_argmax(v: Tensor) -> Tensor:
    """``v.argmax(0)`` for ``v (C, n)`` (first maximum), as ``C`` elementwise passes (a strided
    ``argmax`` over a short leading dim is ~5x slower on the CPU)."""
    best = v[0].clone()
    arg = torch.zeros(v.shape[1], dtype=torch.long, device=v.device)
    for k in range(1, v.shape[0]):
        gt = v[k] > best
        best = torch.where(gt, v[k], best)
        arg.masked_fill_(gt, k)
    return arg
